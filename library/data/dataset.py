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

import torch

from library.data.buckets import BucketAssignment, BucketManager, make_bucket_batches
from library.data.captions import process_caption, resolve_caption
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.features import FeatureTable, feature_cache_path, read_cache
from library.data.images import ImageLoadError
from library.data.index import DatasetIndex
from library.data.latents import LatentJob, bucket_pixels
from library.errors import UserError


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


def collect_items(config: DatasetConfig, pfg_prompt: str, index: DatasetIndex | None = None) -> tuple[list[TrainItem], list[ImageLoadError]]:
    """Every image of every subset with its bucket and base caption; unreadable files reported.
    Image sizes come from each folder's index (library.data.index), which one scandir pass checks:
    only new and changed images have their headers read. Pass the run's DatasetIndex to share that
    pass with load_feature_table and the latent caches."""
    index = index if index is not None else DatasetIndex()
    items: list[TrainItem] = []
    failures: list[ImageLoadError] = []
    for dataset_index, dataset in enumerate(config.datasets):
        buckets = BucketManager.for_dataset(dataset)
        assigned: dict[tuple[int, int], BucketAssignment] = {}  # one assignment per image size, shared
        for subset in dataset.subsets:
            for image in index.folder(subset.image_dir, subset.cache_dir).images():
                if image.failure is not None:
                    failures.append(image.failure)
                    continue
                assignment = assigned.get(image.size)
                if assignment is None:
                    try:
                        assignment = assigned[image.size] = buckets.assign(image.size)
                    except UserError as e:
                        failures.append(ImageLoadError(image.path, str(e)))
                        continue
                caption = resolve_caption(image.path, subset.caption_extension, subset.class_tokens, pfg_prompt)
                items.append(TrainItem(image.path, image.size, caption, subset, dataset_index, assignment))
    index.save()
    return items, failures


def _listed(paths: list[str]) -> str:
    return "\n  ".join(paths[:5]) + (f"\n  ... and {len(paths) - 5} more" if len(paths) > 5 else "")


def load_feature_table(items: list[TrainItem], index: DatasetIndex | None = None) -> tuple[FeatureTable, str]:
    """All PFG vectors (a FeatureTable, row i for item i, memory-mapped from the folder indexes)
    and the id of the encoder that made them. Missing caches, caches of images edited since, caches
    from another encoder than the subset pins or from different encoders, and non-finite vectors
    are each one clear error: never silently used. A cache is read only when its stat differs from
    its folder index's record (new, rewritten, or its image changed)."""
    index = index if index is not None else DatasetIndex()
    folders = [index.folder(item.subset.image_dir, item.subset.cache_dir) for item in items]
    records, missing = [], []
    for item, folder in zip(items, folders):
        record = folder.feature(item.image_path, item.feature_path, read_cache)
        if record is None:
            missing.append(str(item.feature_path))
        records.append(record)
    if missing:
        raise UserError(f"{len(missing)} feature caches are missing; run prepare_features.py (or pass --tagger_model):\n  {_listed(missing)}")
    stale = [f"{item.feature_path} (image {item.image_path})" for item, record in zip(items, records) if not record.current]
    if stale:
        raise UserError(f"{len(stale)} feature caches were made from another version of their image (edited, replaced, "
                        f"or an old cache layout); rerun prepare_features.py (or pass --tagger_model):\n  {_listed(stale)}")
    for item, record in zip(items, records):
        if item.subset.encoder and record.encoder_id != item.subset.encoder:
            raise UserError(f"feature cache {item.feature_path} comes from encoder {record.encoder_id!r}, but its subset pins "
                            f"encoder = {item.subset.encoder!r}; rerun prepare_features.py with that tagger")
    encoders = Counter(record.encoder_id for record in records)
    if len(encoders) > 1:
        raise UserError(f"feature caches come from different encoders {dict(encoders)}; rerun prepare_features.py with one --tagger_model")
    for item, record in zip(items, records):
        if not record.finite:
            raise UserError(f"feature cache {item.feature_path} holds NaN/inf values; delete it and rerun prepare_features.py")
    index.save()  # the vectors read now join the index files, and are served from them
    sources = []
    for item, folder in zip(items, folders):
        source = folder.vector_source(item.image_path)
        if source is None:  # valid, but the folder's index keeps another encoder's vectors
            source = (read_cache(item.feature_path)[0][None], 0)
        sources.append(source)
    return FeatureTable.from_sources(sources), next(iter(encoders), "")


def load_features(items: list[TrainItem], index: DatasetIndex | None = None) -> tuple[torch.Tensor, str]:
    """load_feature_table's vectors as one (num_items, D) tensor, for small sets (evaluation)."""
    table, encoder_id = load_feature_table(items, index)
    return table.tensor(), encoder_id


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


_last_epoch: list = []  # [(items, len(items), batch sizes, seed, epoch), batches] of the latest call


def epoch_batches(items: list[TrainItem], batch_sizes: list[int], seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """The batches of one epoch: each image `num_repeats` times, batches from one bucket of one
    dataset, shuffled with a seed of (seed, epoch). Elements are (item index, sample seed).

    The latest result is kept and handed out again for the same arguments (the same `items` list
    object): the plan, the summary and the loop all ask for epoch 0 at the start, and each call
    costs about 5 us per image (half a second at 100k). Callers must not change it."""
    key = (items, len(items), tuple(batch_sizes), seed, epoch)
    if _last_epoch and _last_epoch[0][0] is items and _last_epoch[0][1:] == key[1:]:
        return _last_epoch[1]
    batches = _epoch_batches(items, batch_sizes, seed, epoch)
    _last_epoch[:] = [key, batches]
    return batches


def _epoch_batches(items: list[TrainItem], batch_sizes: list[int], seed: int, epoch: int) -> list[list[tuple[int, int]]]:
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
