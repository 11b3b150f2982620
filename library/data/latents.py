"""Training images as VAE latents: the bucket transform, VAE encoding and the disk cache.

The cache file `<stem>_<WWWW>x<HHHH>_sd.npz` uses kohya's layout (`latents`, `original_size`,
`crop_ltrb`, optional `latents_flipped`) plus validation keys (`vae_id`, `bucket`,
`source_size`, `source_mtime`). A cache whose VAE, bucket or source image changed is
recomputed, never silently used.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from library.data.augment import bucket_image, to_tensor
from library.data.buckets import BucketAssignment
from library.fileio import atomic_path
from library.data.images import load_image


class LatentJob(NamedTuple):
    """One image to encode: where it is, its bucket, its size before bucketing (kept in the cache,
    as kohya does), the cache folder (None: beside the image), whether a mirrored copy is needed
    and the subset's resize_interpolation (None: lanczos)."""

    image_path: Path
    assignment: BucketAssignment
    original_size: tuple[int, int]
    cache_dir: Path | None
    flip: bool
    interpolation: str | None = None

    @property
    def cache_path(self) -> Path:
        return latent_cache_path(self.image_path, self.assignment.bucket, self.cache_dir)


def latent_cache_path(image_path: Path, bucket: tuple[int, int], cache_dir: Path | None = None) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else Path(image_path).parent
    return folder / f"{Path(image_path).stem}_{bucket[0]:04d}x{bucket[1]:04d}_sd.npz"


def vae_id(vae: torch.nn.Module) -> str:
    """Content hash of the VAE weights: caches made with another VAE are not reused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def bucket_pixels(image_path: Path, assignment: BucketAssignment, flip: bool = False,
                  interpolation: str | None = None) -> torch.Tensor:
    """Load, resize to cover the bucket, crop, optionally mirror; (3, H, W) in [-1, 1]."""
    image = bucket_image(load_image(image_path), assignment, interpolation)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)


@torch.no_grad()
def encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8), sampled as kohya does."""
    param = next(vae.parameters())
    latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.sample()
    return latents * vae.config.scaling_factor


def _source_stat(image_path: Path) -> tuple[int, float]:
    st = os.stat(image_path)
    return int(st.st_size), float(st.st_mtime)


def save_latent_cache(
    path: Path,
    latents: torch.Tensor,
    flipped: torch.Tensor | None,
    assignment: BucketAssignment,
    original_size: tuple[int, int],
    image_path: Path,
    vae_identity: str,
) -> None:
    size, mtime = _source_stat(image_path)
    arrays = {
        "latents": latents.float().cpu().numpy(),
        "original_size": np.array(original_size, dtype=np.int64),
        "crop_ltrb": np.array(assignment.crop_ltrb, dtype=np.int64),
        "vae_id": np.array(vae_identity),
        "bucket": np.array(assignment.bucket, dtype=np.int64),
        "source_size": np.array(size, dtype=np.int64),
        "source_mtime": np.array(mtime, dtype=np.float64),
    }
    if flipped is not None:
        arrays["latents_flipped"] = flipped.float().cpu().numpy()
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def load_valid_latents(
    path: Path, assignment: BucketAssignment, image_path: Path, vae_identity: str, need_flipped: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(latents, flipped latents or None) when the cache matches VAE, bucket and image; else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            size, mtime = _source_stat(image_path)
            valid = (
                str(data["vae_id"]) == vae_identity
                and tuple(data["bucket"].tolist()) == tuple(assignment.bucket)
                and tuple(data["crop_ltrb"].tolist()) == tuple(assignment.crop_ltrb)
                and int(data["source_size"]) == size
                and float(data["source_mtime"]) == mtime
                and (not need_flipped or "latents_flipped" in data)
            )
            if not valid:
                return None
            latents = torch.from_numpy(data["latents"])
            flipped = torch.from_numpy(data["latents_flipped"]) if "latents_flipped" in data else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    bucket_w, bucket_h = assignment.bucket
    if latents.ndim != 3 or latents.shape[1] * 8 != bucket_h or latents.shape[2] * 8 != bucket_w:
        return None
    return latents, flipped


def cache_latents(
    jobs: list[LatentJob],
    vae: torch.nn.Module,
    to_disk: bool,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Encode every job once.

    Valid disk caches are read instead of recomputed; with `to_disk` new ones are written.
    Returns job index -> (latents, flipped latents or None), on the CPU. Images of one bucket
    are encoded together.
    """
    from tqdm import tqdm

    identity = vae_id(vae)
    result: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    todo: dict[tuple[int, int], list[int]] = {}
    for index, job in enumerate(jobs):
        cached = load_valid_latents(job.cache_path, job.assignment, job.image_path, identity, job.flip)
        if cached is not None:
            result[index] = cached
        else:
            todo.setdefault(job.assignment.bucket, []).append(index)
    count = sum(len(v) for v in todo.values())
    bar = tqdm(total=count, desc="caching latents", disable=not progress or count == 0)
    for bucket_indices in todo.values():
        for start in range(0, len(bucket_indices), batch_size):
            chunk = bucket_indices[start : start + batch_size]
            pixels = torch.stack([bucket_pixels(jobs[i].image_path, jobs[i].assignment, interpolation=jobs[i].interpolation)
                                  for i in chunk])
            latents = encode_pixels(vae, pixels).float().cpu()
            flipped = None
            if any(jobs[i].flip for i in chunk):
                flipped = encode_pixels(vae, torch.flip(pixels, dims=[3])).float().cpu()
            for k, i in enumerate(chunk):
                job = jobs[i]
                entry = (latents[k], flipped[k] if job.flip and flipped is not None else None)
                result[i] = entry
                if to_disk:
                    save_latent_cache(job.cache_path, entry[0], entry[1], job.assignment, job.original_size, job.image_path, identity)
            bar.update(len(chunk))
    bar.close()
    return result
