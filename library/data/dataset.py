"""The training dataset: images of a dataset config, their buckets, captions, PFG vectors and
latents, and the per-epoch batch order.

Randomness per sample (caption shuffle/dropout, flip) comes from a seed derived from
(run seed, epoch, position), not from global state, so the data order and augmentations are
the same after `--resume` and independent of DataLoader workers.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.data.buckets import BucketAssignment, BucketManager, make_bucket_batches
from library.data.captions import process_caption, resolve_caption
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.errors import UserError
from library.data.features import feature_cache_path, read_cache
from library.data.images import HEADER_ERRORS, ImageLoadError, list_images
from library.data.latents import LatentJob, bucket_pixels


@dataclass(frozen=True)
class TrainItem:
    image_path: Path
    original_size: tuple[int, int]
    caption: str  # before shuffle/dropout
    subset: SubsetConfig
    dataset_index: int
    assignment: BucketAssignment

    @property
    def feature_path(self) -> Path:
        return feature_cache_path(self.image_path, self.subset.cache_dir)

    @property
    def latent_path(self) -> Path:
        return self.latent_job().cache_path

    def latent_job(self, cache_dir: Path | None = None, flip: bool | None = None) -> LatentJob:
        """This image as a latent-caching job: its subset's cache folder and flip_aug unless given."""
        return LatentJob(self.image_path, self.assignment, self.original_size, cache_dir or self.subset.cache_dir,
                         self.subset.flip_aug if flip is None else flip)


def _image_size(path: Path) -> tuple[int, int]:
    """Header-only read; EXIF rotation swaps the sides as load_image will."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except HEADER_ERRORS as e:
        raise ImageLoadError(path, f"cannot read image header ({type(e).__name__}: {e})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def collect_items(config: DatasetConfig, pfg_prompt: str) -> tuple[list[TrainItem], list[ImageLoadError]]:
    """Every image of every subset with its bucket and base caption; unreadable files reported."""
    items: list[TrainItem] = []
    failures: list[ImageLoadError] = []
    for dataset_index, dataset in enumerate(config.datasets):
        buckets = BucketManager.for_dataset(dataset)
        for subset in dataset.subsets:
            for path in list_images(subset.image_dir):
                try:
                    size = _image_size(path)
                    assignment = buckets.assign(size)
                except ImageLoadError as e:
                    failures.append(e)
                    continue
                except UserError as e:
                    failures.append(ImageLoadError(path, str(e)))
                    continue
                caption = resolve_caption(path, subset.caption_extension, subset.class_tokens, pfg_prompt)
                items.append(TrainItem(path, size, caption, subset, dataset_index, assignment))
    return items, failures


def _listed(paths: list[str]) -> str:
    return "\n  ".join(paths[:5]) + (f"\n  ... and {len(paths) - 5} more" if len(paths) > 5 else "")


def load_features(items: list[TrainItem]) -> tuple[torch.Tensor, str]:
    """All PFG vectors (num_items, D) and the id of the encoder that made them. Missing caches,
    caches of images edited since, caches from another encoder than the subset pins or from
    different encoders, and non-finite vectors are each one clear error: never silently used."""
    missing = [str(item.feature_path) for item in items if not item.feature_path.is_file()]
    if missing:
        raise UserError(f"{len(missing)} feature caches are missing; run prepare_features.py (or pass --tagger_model):\n  {_listed(missing)}")
    caches = [read_cache(item.feature_path, item.image_path) for item in items]  # one read per file
    stale = [f"{item.feature_path} (image {item.image_path})" for item, (_, _, current) in zip(items, caches) if not current]
    if stale:
        raise UserError(f"{len(stale)} feature caches were made from another version of their image (edited, replaced, "
                        f"or an old cache layout); rerun prepare_features.py (or pass --tagger_model):\n  {_listed(stale)}")
    vectors = [vector for vector, _, _ in caches]
    encoder_ids = [encoder_id for _, encoder_id, _ in caches]
    for item, encoder_id in zip(items, encoder_ids):
        if item.subset.encoder and encoder_id != item.subset.encoder:
            raise UserError(f"feature cache {item.feature_path} comes from encoder {encoder_id!r}, but its subset pins "
                            f"encoder = {item.subset.encoder!r}; rerun prepare_features.py with that tagger")
    encoders = Counter(encoder_ids)
    if len(encoders) > 1:
        raise UserError(f"feature caches come from different encoders {dict(encoders)}; rerun prepare_features.py with one --tagger_model")
    for item, vector in zip(items, vectors):
        if not np.isfinite(vector).all():
            raise UserError(f"feature cache {item.feature_path} holds NaN/inf values; delete it and rerun prepare_features.py")
    return torch.from_numpy(np.stack(vectors)), next(iter(encoders))


def sdxl_time_ids(item: TrainItem, flip: bool = False) -> torch.Tensor:
    """SDXL's micro-conditioning of one sample, (original h, original w, crop top, crop left,
    target h, target w): the image's size before bucketing, the pixels the bucket's center crop
    cut from the top and left of the resized image (the SDXL paper's and diffusers' convention),
    and the bucket size. (kohya's `get_crop_ltrb` reports a letterbox offset instead — for an
    image cropped at the sides it gives a top offset and left 0; we condition on the crop that
    actually happened.) A mirrored image was cropped from the other side, so its left margin is
    the crop's right margin (as kohya). Other families ignore them."""
    left, top, right, bottom = item.assignment.crop_ltrb
    if flip:
        width = item.assignment.resized_size[0]
        left, right = width - right, width - left
    (original_w, original_h), (target_w, target_h) = item.original_size, item.assignment.bucket
    return torch.tensor([original_h, original_w, top, left, target_h, target_w])


def bucket_counts(items: list[TrainItem]) -> Counter:
    return Counter(item.assignment.bucket for item in items)


def epoch_batches(items: list[TrainItem], batch_sizes: list[int], seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """The batches of one epoch: each image `num_repeats` times, batches from one bucket of one
    dataset, shuffled with a seed of (seed, epoch). Elements are (item index, sample seed)."""
    rng = random.Random(f"{seed}-{epoch}")
    batches: list[list[int]] = []
    for dataset_index, batch_size in enumerate(batch_sizes):
        indices = [i for i, item in enumerate(items) if item.dataset_index == dataset_index for _ in range(item.subset.num_repeats)]
        buckets = [items[i].assignment.bucket for i in indices]
        batches += [[indices[k] for k in batch] for batch in make_bucket_batches(buckets, batch_size, rng)]
    rng.shuffle(batches)
    return [[(index, rng.getrandbits(63)) for index in batch] for batch in batches]


class PFGDataset(torch.utils.data.Dataset):
    """Element key: (item index, sample seed) as produced by `epoch_batches`."""

    def __init__(self, items: list[TrainItem], features: torch.Tensor, latents: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None):
        self.items = items
        self.features = features
        self.latents = latents or {}  # item index -> (latents, flipped latents)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, sample_seed = key
        item = self.items[index]
        rng = random.Random(sample_seed)
        flip = item.subset.flip_aug and rng.random() < 0.5
        subset = item.subset
        caption = process_caption(item.caption, subset.shuffle_caption, subset.keep_tokens, subset.caption_dropout_rate, rng)
        sample = {"caption": caption, "feature": self.features[index], "index": index, "time_ids": sdxl_time_ids(item, flip)}
        if index in self.latents:
            latents, flipped = self.latents[index]
            sample["latents"] = flipped if flip else latents
        else:
            sample["pixels"] = bucket_pixels(item.image_path, item.assignment, flip)
        return sample


def collate(samples: list[dict]) -> dict:
    batch = {
        "captions": [s["caption"] for s in samples],
        "features": torch.stack([s["feature"] for s in samples]),
        "indices": torch.tensor([s["index"] for s in samples]),
        "time_ids": torch.stack([s["time_ids"] for s in samples]),
    }
    key = "latents" if "latents" in samples[0] else "pixels"
    if any(key not in s for s in samples):
        raise RuntimeError("a batch mixes cached latents and pixels")
    batch[key] = torch.stack([s[key] for s in samples])
    return batch
