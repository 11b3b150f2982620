"""The training dataset: images of a dataset config, their buckets, captions, PFG vectors and
latents, and the per-epoch batch order.

Randomness per sample (flip, random crop, color augmentation, the caption's wildcards, shuffle
and dropouts) comes from a seed derived from (run seed, epoch, position), not from global state,
so the data order and augmentations are the same after `--resume` and independent of DataLoader
workers. A sample's key also carries its epoch and step, which kohya's epoch- and step-dependent
caption keys (caption_dropout_every_n_epochs, token warmup) read.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from library.data.augment import ColorShift, draw_color_shift, draw_random_crop, latent_mask, sample_pixels
from library.data.buckets import BucketAssignment, BucketManager, make_bucket_batches
from library.data.captions import process_caption, resolve_caption
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.features import FeatureTable, feature_cache_path, read_cache
from library.data.fine_tuning import metadata_images
from library.data.images import ImageLoadError, list_images
from library.data.index import DatasetIndex, ScannedImage
from library.data.latents import LatentJob
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
                         self.subset.flip_aug if flip is None else flip, self.subset.resize_interpolation)


def subset_images(subset: SubsetConfig) -> tuple[list[tuple[Path, str | None]], list[ImageLoadError]]:
    """The subset's images, each with its caption when a metadata_file gives it (else None), and
    the metadata entries whose image is missing."""
    if subset.metadata_file is None:
        return [(path, None) for path in list_images(subset.image_dir)], []
    return metadata_images(subset.metadata_file, subset.image_dir, subset.caption_separator, subset.enable_wildcard)


def indexed_images(subset: SubsetConfig, index: DatasetIndex) -> tuple[list[tuple[ScannedImage, str | None]], list[ImageLoadError]]:
    """subset_images as the folder indexes know them (size, or why the image cannot be used):
    a folder subset's own index; a metadata_file's entries from the index of the folder each
    image is in (every image is in its own folder's scan)."""
    if subset.metadata_file is None:
        return [(image, None) for image in index.folder(subset.image_dir, subset.cache_dir).images()], []
    listed, missing = subset_images(subset)
    scans: dict[Path, dict[str, ScannedImage]] = {}
    found = []
    for path, caption in listed:
        if path.parent not in scans:
            scans[path.parent] = {image.path.name: image for image in index.folder(path.parent, subset.cache_dir).images()}
        image = scans[path.parent].get(path.name)
        if image is None:
            missing.append(ImageLoadError(path, "not an image file this loader reads"))
            continue
        found.append((image, caption))
    return found, missing


def base_caption(subset: SubsetConfig, path: Path, listed: str | None, pfg_prompt: str) -> str:
    """The caption before any per-step processing: the metadata_file's, or the caption file's,
    else class_tokens, else --pfg_prompt."""
    if subset.metadata_file is not None:
        return listed if listed is not None else (pfg_prompt or "")
    return resolve_caption(path, subset.caption_extension, subset.class_tokens, pfg_prompt, subset.enable_wildcard)


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
            images, missing = indexed_images(subset, index)
            failures += missing
            for image, listed_caption in images:
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
                caption = base_caption(subset, image.path, listed_caption, pfg_prompt)
                items.append(TrainItem(image.path, image.size, caption, subset, dataset_index, assignment))
    index.save()
    return items, failures


def split_validation(items: list[TrainItem], config: DatasetConfig, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) item indices of the datasets' validation_split, as kohya splits: per
    subset (regularisation subsets are never held out), the images shuffled with validation_seed
    (default: the run's seed) and the last round(n * split) of them held out. Unlike kohya, the two
    parts never share an image (kohya's rounding can put one image in both)."""
    held: list[int] = []
    for dataset_index, dataset in enumerate(config.datasets):
        if dataset.validation_split <= 0:
            continue
        for subset in dataset.subsets:
            if subset.is_reg:
                continue
            indices = [i for i, item in enumerate(items) if item.dataset_index == dataset_index and item.subset is subset]
            random.Random(dataset.validation_seed if dataset.validation_seed is not None else seed).shuffle(indices)
            count = round(len(indices) * dataset.validation_split)
            held += indices[len(indices) - count:] if count else []
    held_set = set(held)
    return [i for i in range(len(items)) if i not in held_set], sorted(held_set)


def _listed(paths: list[str]) -> str:
    return "\n  ".join(paths[:5]) + (f"\n  ... and {len(paths) - 5} more" if len(paths) > 5 else "")


def load_feature_table(items: list[TrainItem], index: DatasetIndex | None = None) -> tuple[FeatureTable, str]:
    """All PFG vectors (a FeatureTable, row i for item i, memory-mapped from the folder indexes)
    and the id of the encoder that made them. Missing caches, caches of images edited since, caches
    from another encoder than the subset pins or from different encoders, and non-finite vectors
    are each one clear error: never silently used. A cache is read only when its stat differs from
    its folder index's record (new, rewritten, or its image changed)."""
    index = index if index is not None else DatasetIndex()
    folders = [index.folder(item.image_path.parent, item.subset.cache_dir) for item in items]  # as indexed_images
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


class SampleKey(NamedTuple):
    """One sample of one epoch: the item, the seed of its randomness, and (for kohya's epoch- and
    step-dependent caption keys) the epoch (0-based) and the optimizer steps done before it."""

    index: int
    seed: int
    epoch: int = 0
    step: int = 0


def bucket_counts(items: list[TrainItem]) -> Counter:
    return Counter(item.assignment.bucket for item in items)


_last_epoch: list = []  # [(items, len(items), batch sizes, seed, epoch), batches] of the latest call


def epoch_batches(items: list[TrainItem], batch_sizes: list[int], seed: int, epoch: int) -> list[list[SampleKey]]:
    """The batches of one epoch: each image `num_repeats` times, batches from one bucket of one
    dataset, shuffled with a seed of (seed, epoch). Elements are SampleKeys (step 0: see at_steps).

    The latest result is kept and handed out again for the same arguments (the same `items` list
    object): the plan, the summary and the loop all ask for epoch 0 at the start, and each call
    costs about 5 us per image (half a second at 100k). Callers must not change it."""
    key = (items, len(items), tuple(batch_sizes), seed, epoch)
    if _last_epoch and _last_epoch[0][0] is items and _last_epoch[0][1:] == key[1:]:
        return _last_epoch[1]
    batches = _epoch_batches(items, batch_sizes, seed, epoch)
    _last_epoch[:] = [key, batches]
    return batches


def _epoch_batches(items: list[TrainItem], batch_sizes: list[int], seed: int, epoch: int) -> list[list[SampleKey]]:
    rng = random.Random(f"{seed}-{epoch}")
    batches: list[list[int]] = []
    for dataset_index, batch_size in enumerate(batch_sizes):
        indices = [i for i, item in enumerate(items) if item.dataset_index == dataset_index for _ in range(item.subset.num_repeats)]
        buckets = [items[i].assignment.bucket for i in indices]
        batches += [[indices[k] for k in batch] for batch in make_bucket_batches(buckets, batch_size, rng)]
    rng.shuffle(batches)
    return [[SampleKey(index, rng.getrandbits(63), epoch) for index in batch] for batch in batches]


def at_steps(batches: list[list[SampleKey]], first_step: int, batches_per_step: int) -> list[list[SampleKey]]:
    """The batches of one process's epoch with the step each will train at (for token warmup)."""
    return [[key._replace(step=first_step + k // batches_per_step) for key in batch] for k, batch in enumerate(batches)]


@dataclass(frozen=True)
class SampleDraw:
    """What one sample's randomness decided, drawn before any pixel is read (so --debug_dataset
    prints exactly the captions training uses): in kohya's order flip, crop, colour, caption."""

    flip: bool
    assignment: BucketAssignment  # the bucket crop, moved by random_crop
    color: ColorShift | None
    caption: str


def draw_sample(item: TrainItem, key: SampleKey, total_steps: int) -> SampleDraw:
    rng = random.Random(key.seed)
    subset = item.subset
    flip = subset.flip_aug and rng.random() < 0.5
    assignment = draw_random_crop(item.assignment, rng) if subset.random_crop else item.assignment
    color = draw_color_shift(rng) if subset.color_aug else None
    caption = process_caption(item.caption, subset.caption_options, rng, epoch=key.epoch + 1, step=key.step,
                              total_steps=total_steps)
    return SampleDraw(flip, assignment, color, caption)


def sdxl_time_ids(item: TrainItem, flip: bool = False, assignment: BucketAssignment | None = None) -> torch.Tensor:
    """SDXL's micro-conditioning of one sample, (original h, original w, crop top, crop left,
    target h, target w): the image's size before bucketing, the pixels the bucket's crop cut from
    the top and left of the resized image (the SDXL paper's and diffusers' convention; with
    random_crop the crop this sample got), and the bucket size. (kohya's `get_crop_ltrb` reports a
    letterbox offset instead — for an image cropped at the sides it gives a top offset and left 0;
    we condition on the crop that actually happened.) A mirrored image was cropped from the other
    side, so its left margin is the crop's right margin (as kohya). Other families ignore them."""
    assignment = assignment or item.assignment
    left, top, right, bottom = assignment.crop_ltrb
    if flip:
        width = assignment.resized_size[0]
        left, right = width - right, width - left
    (original_w, original_h), (target_w, target_h) = item.original_size, assignment.bucket
    return torch.tensor([original_h, original_w, top, left, target_h, target_w])


class PFGDataset(torch.utils.data.Dataset):
    """Element key: a SampleKey (or an (item index, sample seed) pair) as `epoch_batches` makes them.

    With cached latents the alpha masks of alpha_mask subsets are read from the images once and
    kept at latent resolution (the latent caches do not hold them); without, each sample's mask
    comes with its pixels, at pixel resolution. The trainer scales either to the latents (area)."""

    def __init__(self, items: list[TrainItem], features: torch.Tensor,
                 latents: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None, total_steps: int = 0):
        self.items = items
        self.features = features
        self.latents = latents or {}  # item index -> (latents, flipped latents)
        self.total_steps = total_steps  # for token warmup given as a fraction of the run
        self._latent_masks: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        key = SampleKey(*key)
        index = key.index
        item = self.items[index]
        draw = draw_sample(item, key, self.total_steps)
        sample = {"caption": draw.caption, "feature": self.features[index], "index": index,
                  "time_ids": sdxl_time_ids(item, draw.flip, draw.assignment)}
        if index in self.latents:
            latents, flipped = self.latents[index]
            sample["latents"] = flipped if draw.flip else latents
            if item.subset.alpha_mask:
                mask = self._latent_mask(index, latents.shape[-2:])
                sample["mask"] = torch.flip(mask, dims=[-1]) if draw.flip else mask
        else:
            sample["pixels"], mask = sample_pixels(item.image_path, draw.assignment, draw.flip,
                                                   item.subset.resize_interpolation, draw.color, item.subset.alpha_mask)
            if mask is not None:
                sample["mask"] = mask
        return sample

    def _latent_mask(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        if index not in self._latent_masks:
            item = self.items[index]
            self._latent_masks[index] = latent_mask(item.image_path, item.assignment, item.subset.resize_interpolation, size)
        return self._latent_masks[index]


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
    masks = [s.get("mask") for s in samples]
    if any(m is not None for m in masks):  # images of subsets without alpha_mask weigh fully, as in kohya
        shape = next(m for m in masks if m is not None).shape
        batch["masks"] = torch.stack([m if m is not None else torch.ones(shape) for m in masks])
    return batch
