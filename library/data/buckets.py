"""Aspect-ratio bucketing (NovelAI's scheme, as kohya sd-scripts implements it).

Images of different shapes train together without squashing: each image goes to a bucket (a
resolution of about the target area whose sides are multiples of `bucket_reso_steps`), is resized
keeping its aspect ratio until it covers the bucket, and is center-cropped to it. A batch only
holds images of one bucket, so every batch is one tensor shape.

The bucket table and the choice of bucket follow kohya's `make_bucket_resolutions` and
`BucketManager.select_bucket`, so the same image lands in the same bucket (and latent caches
named `_WWWWxHHHH_` match). Two deliberate differences: table entries with a side below
`min_size` are dropped (kohya can emit them when `min_size` is large), and with
`bucket_no_upscale` an image is also shrunk so that no side exceeds `max_bucket_reso`.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Protocol, Sequence

from library.errors import UserError

Size = tuple[int, int]  # (width, height) in pixels


class ShuffleRng(Protocol):
    """random.Random and numpy.random.Generator both qualify."""

    def shuffle(self, x: list) -> None: ...


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: resize to `resized_size`, then crop `crop_ltrb` (in resized pixels)."""

    bucket: Size
    resized_size: Size
    crop_ltrb: tuple[int, int, int, int]


def make_bucket_resolutions(max_reso: Size, min_size: int, max_size: int, divisible: int) -> list[Size]:
    """All buckets for a target resolution, sorted by (width, height).

    The square of the target area, then for every width from min_size to max_size in steps of
    `divisible` the tallest height (a multiple of `divisible`, at most max_size) that keeps the area
    within the target, plus the transposed bucket.
    """
    return list(_bucket_table(tuple(max_reso), min_size, max_size, divisible))


@lru_cache(maxsize=32)
def _bucket_table(max_reso: Size, min_size: int, max_size: int, divisible: int) -> tuple[Size, ...]:
    max_area = (max_reso[0] // divisible) * (max_reso[1] // divisible)  # in step² units
    side = int(math.sqrt(max_area)) * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, (max_area // (width // divisible)) * divisible)
        resos.add((width, height))
        resos.add((height, width))
    return tuple(sorted(r for r in resos if min_size <= min(r) and max(r) <= max_size))


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


class BucketManager:
    """Assigns images of one dataset to buckets (or to the fixed resolution when bucketing is off)."""

    def __init__(
        self,
        resolution: Size,
        enable_bucket: bool = True,
        min_bucket_reso: int = 256,
        max_bucket_reso: int = 1024,
        bucket_reso_steps: int = 64,
        bucket_no_upscale: bool = False,
    ) -> None:
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.enable_bucket = enable_bucket
        self.min_size = min_bucket_reso
        self.max_size = max_bucket_reso
        self.steps = bucket_reso_steps
        self.no_upscale = bucket_no_upscale
        self.max_area = self.resolution[0] * self.resolution[1]
        if enable_bucket and not bucket_no_upscale:
            self.table = _bucket_table(self.resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
            self._table_set = set(self.table)
            self._table_ars = [w / h for w, h in self.table]
        else:
            self.table = ()

    @classmethod
    def for_dataset(cls, dataset) -> "BucketManager":
        """From a dataset_config.DatasetBlueprint (anything with the same field names)."""
        return cls(dataset.resolution, dataset.enable_bucket, dataset.min_bucket_reso, dataset.max_bucket_reso,
                   dataset.bucket_reso_steps, dataset.bucket_no_upscale)

    def assign(self, image_size: Size) -> BucketAssignment:
        w, h = int(image_size[0]), int(image_size[1])
        if w <= 0 or h <= 0:
            raise UserError(f"image size {w}x{h} is empty")
        if not self.enable_bucket:
            return _cover_and_center_crop((w, h), self.resolution)
        if self.no_upscale:
            return self._assign_no_upscale(w, h)
        return self._assign_from_table(w, h)

    def _assign_from_table(self, w: int, h: int) -> BucketAssignment:
        if (w, h) in self._table_set:
            bucket = (w, h)
        else:
            ar = w / h
            # nearest aspect ratio by plain difference, exactly as kohya picks it
            i = min(range(len(self.table)), key=lambda k: abs(self._table_ars[k] - ar))
            bucket = self.table[i]
        return _cover_and_center_crop((w, h), bucket)

    def _assign_no_upscale(self, w: int, h: int) -> BucketAssignment:
        ar = w / h
        scale = min(1.0, math.sqrt(self.max_area / (w * h)), self.max_size / w, self.max_size / h)
        if scale >= 1.0:
            resized = (w, h)  # small enough already: only the crop to the step grid
        else:
            # like kohya: put one side on the step grid, derive the other from the aspect ratio and
            # keep the choice that distorts the aspect ratio least. Rounding down is the fallback
            # that can never exceed the target area or max_bucket_reso.
            floor = lambda x: int(x) - int(x) % self.steps
            sides = [(_round_to_steps(w * scale, self.steps), None), (None, _round_to_steps(h * scale, self.steps)),
                     (floor(w * scale), None), (None, floor(h * scale))]
            candidates = []
            for bw, bh in sides:
                size = (bw, int(bw / ar + 0.5)) if bw is not None else (int(bh * ar + 0.5), bh)
                size = (min(size[0], w), min(size[1], h))  # rounding must never upscale
                bucket = self._floor_to_steps(size)
                if (min(bucket) >= self.steps and bucket[0] * bucket[1] <= self.max_area
                        and max(bucket) <= self.max_size):
                    candidates.append(size)
            if not candidates:
                raise UserError(self._too_small(w, h))
            resized = min(candidates, key=lambda s: abs(s[0] / s[1] - ar))
        bucket = self._floor_to_steps(resized)
        if min(bucket) < self.steps:
            raise UserError(self._too_small(w, h))
        return _center_crop(resized, bucket)

    def _floor_to_steps(self, size: Size) -> Size:
        return (size[0] - size[0] % self.steps, size[1] - size[1] % self.steps)

    def _too_small(self, w: int, h: int) -> str:
        return (f"an image of {w}x{h} has a side shorter than bucket_reso_steps={self.steps} at the target size, so "
                "bucket_no_upscale has no bucket for it; remove the image or lower bucket_reso_steps")


def _cover_and_center_crop(image_size: Size, bucket: Size) -> BucketAssignment:
    """Resize keeping the aspect ratio so the image covers `bucket`, then center-crop."""
    w, h = image_size
    bw, bh = bucket
    # scale to match the side that is relatively shorter; the other side overhangs
    scale = bh / h if w / h > bw / bh else bw / w
    resized = (max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5)))
    return _center_crop(resized, bucket)


def _center_crop(resized: Size, bucket: Size) -> BucketAssignment:
    left = (resized[0] - bucket[0]) // 2
    top = (resized[1] - bucket[1]) // 2
    return BucketAssignment(bucket, resized, (left, top, left + bucket[0], top + bucket[1]))


def assign_bucket(
    image_size: Size,
    resolution: Size,
    *,
    enable_bucket: bool = True,
    min_bucket_reso: int = 256,
    max_bucket_reso: int = 1024,
    bucket_reso_steps: int = 64,
    bucket_no_upscale: bool = False,
) -> BucketAssignment:
    """One-off assignment; build a BucketManager once when assigning many images."""
    manager = BucketManager(resolution, enable_bucket, min_bucket_reso, max_bucket_reso, bucket_reso_steps,
                            bucket_no_upscale)
    return manager.assign(image_size)


def format_bucket_table(counts: Mapping[Size, int]) -> str:
    """The table printed at training start: one line per bucket, widest aspect ratio last."""
    if not counts:
        return "no buckets (no images)"
    lines = [f"{'bucket':>11}  {'aspect':>6}  {'images':>7}"]
    for (w, h), n in sorted(counts.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0])):
        lines.append(f"{w:>5}x{h:<5}  {w / h:>6.3f}  {n:>7}")
    lines.append(f"{len(counts):>5} buckets  {'':>6}  {sum(counts.values()):>7}")
    return "\n".join(lines)


def make_bucket_batches(
    buckets: Sequence[Size], batch_size: int, rng: ShuffleRng | None = None, shuffle: bool = True
) -> list[list[int]]:
    """Split item indices into batches that each hold items of one bucket only.

    `buckets[i]` is item i's bucket; the caller lists an image num_repeats times to repeat it, so
    every item appears in exactly one batch. Like kohya: shuffle within each bucket, cut into
    batches (the last one of a bucket may be smaller), then shuffle the order of the batches.
    Without shuffling, batches come in bucket order and items in input order. Deterministic for a
    given rng state.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if shuffle and rng is None:
        raise ValueError("shuffle=True needs an rng (random.Random or numpy Generator)")
    by_bucket: dict[Size, list[int]] = defaultdict(list)
    for i, b in enumerate(buckets):
        by_bucket[(int(b[0]), int(b[1]))].append(i)
    batches: list[list[int]] = []
    for key in sorted(by_bucket):
        items = by_bucket[key]
        if shuffle:
            rng.shuffle(items)
        batches.extend(items[i:i + batch_size] for i in range(0, len(items), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return [[int(i) for i in batch] for batch in batches]


def generation_size(width: int, height: int, native: int, reference: Size | None = None) -> Size:
    """The size to generate at; a side of 0 is left to the model.

    Both open: the bucket a training image shaped like `reference` (the guide or init image) would
    land in at the model's native resolution — for SDXL the familiar 1024² set (1216x832,
    832x1216, 1344x768, ...) — or the native square without a reference. One open: the side that
    keeps the native area.
    """
    step = 64 if native >= 512 else 8  # SD-sized models use kohya's 64 px bucket steps; tiny test models 8
    if width and height:
        return width, height
    if width or height:
        other = max(step, round(native * native / (width or height) / step) * step)
        return (width, other) if width else (other, height)
    if reference is None:
        return native, native
    return assign_bucket(reference, (native, native), min_bucket_reso=native // 2, max_bucket_reso=native * 2,
                         bucket_reso_steps=step).bucket
