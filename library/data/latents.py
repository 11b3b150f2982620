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
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from library.data.augment import sample_pixels
from library.data.buckets import BucketAssignment
from library.data.images import ImageLoadError
from library.errors import UserError
from library.fileio import atomic_path

if TYPE_CHECKING:
    from library.data.index import DatasetIndex


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
    image_path = image_path if isinstance(image_path, Path) else Path(image_path)
    folder = image_path.parent if cache_dir is None else cache_dir if isinstance(cache_dir, Path) else Path(cache_dir)
    return folder / f"{image_path.stem}_{bucket[0]:04d}x{bucket[1]:04d}_sd.npz"


def vae_id(vae: torch.nn.Module) -> str:
    """Content hash of the VAE weights: caches made with another VAE are not reused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def bucket_pixels(image_path: Path, assignment: BucketAssignment, flip: bool = False,
                  interpolation: str | None = None) -> torch.Tensor:
    """Load, resize to cover the bucket, crop, optionally mirror; (3, H, W) in [-1, 1]: a training
    sample's pixels without colour shift or mask."""
    return sample_pixels(image_path, assignment, flip, interpolation)[0]


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


def _npy_shape(archive: zipfile.ZipFile, name: str) -> tuple[int, ...]:
    """The shape of an array inside an npz, from its .npy header alone."""
    with archive.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy format {version}")
    return tuple(shape)


def latent_cache_matches(path: Path, assignment: BucketAssignment, image_path: Path, vae_identity: str, need_flipped: bool) -> bool:
    """Whether the cache file fits: made by this VAE, for this bucket and crop, from the image as it
    is now, with flipped latents when they are needed, of the bucket's latent size. Reads the small
    keys and the arrays' headers, not the latents."""
    bucket_w, bucket_h = assignment.bucket
    try:
        with np.load(path, allow_pickle=False) as data:
            size, mtime = _source_stat(image_path)
            if not (str(data["vae_id"]) == vae_identity
                    and tuple(data["bucket"].tolist()) == tuple(assignment.bucket)
                    and tuple(data["crop_ltrb"].tolist()) == tuple(assignment.crop_ltrb)
                    and int(data["source_size"]) == size and float(data["source_mtime"]) == mtime
                    and (not need_flipped or "latents_flipped" in data.files)):
                return False
            names = ["latents", "latents_flipped"] if need_flipped else ["latents"]
            shapes = [_npy_shape(data.zip, name) for name in names]  # the open archive: no second open
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return False
    return all(len(shape) == 3 and shape[1] * 8 == bucket_h and shape[2] * 8 == bucket_w for shape in shapes)


def read_latent_cache(path: Path, assignment: BucketAssignment, vae_identity: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latents, flipped latents or None) of a cache already found valid, read when its batch
    comes; a file changed since (another VAE, bucket or size) is an error, never silently used."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["vae_id"]) != vae_identity or tuple(data["bucket"].tolist()) != tuple(assignment.bucket):
                raise UserError(f"latent cache {path} was replaced during training (another VAE or bucket); "
                                "start again so that it is checked")
            latents = torch.from_numpy(data["latents"])
            flipped = torch.from_numpy(data["latents_flipped"]) if flip else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"latent cache {path} became unreadable during training ({e}); start again to re-encode it") from None
    bucket_w, bucket_h = assignment.bucket
    for array in (latents, flipped) if flip else (latents,):
        if array.ndim != 3 or array.shape[1] * 8 != bucket_h or array.shape[2] * 8 != bucket_w:
            raise UserError(f"latent cache {path} holds latents of shape {tuple(array.shape)}, not the bucket's {bucket_w}x{bucket_h}")
    return latents, flipped


def load_valid_latents(
    path: Path, assignment: BucketAssignment, image_path: Path, vae_identity: str, need_flipped: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(latents, flipped latents or None) when the cache matches VAE, bucket and image; else None."""
    if not latent_cache_matches(path, assignment, image_path, vae_identity, need_flipped):
        return None
    try:
        return read_latent_cache(path, assignment, vae_identity, need_flipped)
    except UserError:  # changed in between
        return None


def valid_latent_caches(jobs: list[LatentJob], vae_identity: str, index: DatasetIndex | None = None) -> list[bool]:
    """Which jobs have a valid disk cache. With a DatasetIndex, a cache whose stat matches its
    record is known valid without opening it; the others are opened and recorded."""
    valid = []
    for job in jobs:
        path = job.cache_path

        def check(job=job, path=path) -> bool:
            return latent_cache_matches(path, job.assignment, job.image_path, vae_identity, job.flip)

        if index is None:
            valid.append(path.is_file() and check())
        else:
            folder = index.folder(job.image_path.parent, job.cache_dir)
            valid.append(folder.latent_valid(job.image_path, path, job.assignment.bucket, job.assignment.crop_ltrb,
                                             vae_identity, job.flip, check))
    return valid


def encode_jobs(jobs: list[LatentJob], vae: torch.nn.Module, store, batch_size: int = 8, progress: bool = True,
                on_error=None) -> None:
    """Encode every job (images of one bucket together) and hand each result to
    `store(job index, latents, flipped latents or None)`, on the CPU. An image that cannot be
    decoded raises its ImageLoadError, or goes to `on_error(job index, error)` when given."""
    from tqdm import tqdm

    todo: dict[tuple[int, int], list[int]] = {}
    for index, job in enumerate(jobs):
        todo.setdefault(job.assignment.bucket, []).append(index)
    with tqdm(total=len(jobs), desc="caching latents", unit="img", disable=not progress or not jobs) as bar:
        for bucket_indices in todo.values():
            for start in range(0, len(bucket_indices), batch_size):
                chunk, images = [], []
                for i in bucket_indices[start : start + batch_size]:
                    try:
                        images.append(bucket_pixels(jobs[i].image_path, jobs[i].assignment, interpolation=jobs[i].interpolation))
                        chunk.append(i)
                    except ImageLoadError as e:
                        if on_error is None:
                            raise
                        on_error(i, e)
                bar.update(len(bucket_indices[start : start + batch_size]) - len(chunk))
                if not chunk:
                    continue
                pixels = torch.stack(images)
                latents = encode_pixels(vae, pixels).float().cpu()
                flipped = None
                if any(jobs[i].flip for i in chunk):
                    flipped = encode_pixels(vae, torch.flip(pixels, dims=[3])).float().cpu()
                for k, i in enumerate(chunk):
                    store(i, latents[k], flipped[k] if jobs[i].flip and flipped is not None else None)
                bar.update(len(chunk))


def write_latent_caches(jobs: list[LatentJob], vae: torch.nn.Module, vae_identity: str, batch_size: int = 8,
                        progress: bool = True, on_error=None) -> None:
    """Encode the jobs into their disk caches, keeping nothing in memory (`on_error`: encode_jobs)."""

    def store(i: int, latents: torch.Tensor, flipped: torch.Tensor | None) -> None:
        job = jobs[i]
        save_latent_cache(job.cache_path, latents, flipped, job.assignment, job.original_size, job.image_path, vae_identity)

    encode_jobs(jobs, vae, store, batch_size, progress, on_error)


def cache_latents(
    jobs: list[LatentJob],
    vae: torch.nn.Module,
    to_disk: bool,
    batch_size: int = 8,
    progress: bool = True,
    index: DatasetIndex | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Every job's latents in memory: valid disk caches read, the others encoded (and, with
    `to_disk`, written). Returns job index -> (latents, flipped latents or None), on the CPU."""
    identity = vae_id(vae)
    result: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    todo = []
    for i, (job, valid) in enumerate(zip(jobs, valid_latent_caches(jobs, identity, index))):
        if valid:
            try:
                result[i] = read_latent_cache(job.cache_path, job.assignment, identity, job.flip)
                continue
            except UserError:  # changed since it was checked: encode it again
                pass
        todo.append(i)

    def store(k: int, latents: torch.Tensor, flipped: torch.Tensor | None) -> None:
        job = jobs[todo[k]]
        result[todo[k]] = (latents, flipped)
        if to_disk:
            save_latent_cache(job.cache_path, latents, flipped, job.assignment, job.original_size, job.image_path, identity)

    encode_jobs([jobs[i] for i in todo], vae, store, batch_size, progress)
    return result


class DiskLatents:
    """`--cache_latents_to_disk`: item index -> (latents, flipped latents or None), read from the
    item's cache file when its sample is loaded (in the DataLoader workers when there are any), so
    host memory does not grow with the dataset. The caches were checked before training."""

    def __init__(self, items: list, vae_identity: str):
        self.items = items  # TrainItems (library.data.dataset)
        self.vae_identity = vae_identity

    def __contains__(self, index: int) -> bool:
        return 0 <= index < len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        job = self.items[index].latent_job()
        return read_latent_cache(job.cache_path, job.assignment, self.vae_identity, job.flip)
