"""Aspect-ratio bucketing: the bucket table, per-image assignment, and one-bucket batches."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from library.data.buckets import (
    BucketManager,
    assign_bucket,
    format_bucket_table,
    generation_size,
    make_bucket_batches,
    make_bucket_resolutions,
)
from library.errors import UserError

CONFIGS = [  # (resolution, min, max, steps)
    ((512, 512), 256, 1024, 64),
    ((768, 768), 256, 1024, 64),
    ((512, 768), 320, 1024, 32),
    ((1024, 1024), 256, 2048, 64),
    ((640, 448), 256, 1024, 64),
]


def random_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(rng.randint(64, 4000), rng.randint(64, 4000)) for _ in range(n)]
    return sizes + [(512, 512), (1, 1), (5000, 64), (64, 5000), (768, 512)]


def test_sd15_table_matches_kohya():
    # kohya sd-scripts' well-known buckets for 512x512, 256..1024, steps 64
    expected = {(512, 512), (256, 1024), (320, 768), (384, 640), (448, 576), (576, 448), (640, 384),
                (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)}
    expected |= {(h, w) for w, h in expected}
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == sorted(expected)


@pytest.mark.parametrize("reso,lo,hi,steps", CONFIGS)
def test_table_within_area_steps_and_limits(reso, lo, hi, steps):
    table = make_bucket_resolutions(reso, lo, hi, steps)
    assert table == sorted(set(table)) and len(table) > 5
    for w, h in table:
        assert w * h <= reso[0] * reso[1]
        assert w % steps == 0 and h % steps == 0
        assert lo <= w <= hi and lo <= h <= hi


@pytest.mark.parametrize("reso,lo,hi,steps", CONFIGS)
def test_assignment_covers_bucket_and_crops_within_bounds(reso, lo, hi, steps):
    manager = BucketManager(reso, True, lo, hi, steps)
    ars = np.array([w / h for w, h in manager.table])
    for w, h in random_sizes(400):
        a = manager.assign((w, h))
        (bw, bh), (rw, rh), (l, t, r, b) = a.bucket, a.resized_size, a.crop_ltrb
        assert a.bucket in manager.table
        # nearest aspect ratio, as kohya's select_bucket picks it
        assert abs(bw / bh - w / h) == pytest.approx(np.abs(ars - w / h).min())
        # resized keeps the aspect ratio (up to rounding) and covers the bucket
        assert rw >= bw and rh >= bh
        assert abs(rw / rh - w / h) <= (w / h) * (1 / rw + 1 / rh) + 1e-9
        # the crop is the bucket, centered, inside the resized image, on one axis only
        assert (r - l, b - t) == (bw, bh)
        assert 0 <= l and 0 <= t and r <= rw and b <= rh
        assert l in ((rw - bw) // 2,) and t in ((rh - bh) // 2,)
        assert min(rw - bw, rh - bh) == 0


@pytest.mark.parametrize("reso,lo,hi,steps", CONFIGS[:3])
def test_common_photo_shapes_lose_at_most_one_step(reso, lo, hi, steps):
    manager = BucketManager(reso, True, lo, hi, steps)
    for aw, ah in [(1, 1), (2, 3), (3, 2), (3, 4), (4, 3), (4, 5), (5, 4), (9, 16), (16, 9), (1, 2), (2, 1)]:
        a = manager.assign((aw * 600, ah * 600))
        assert max(a.resized_size[0] - a.bucket[0], a.resized_size[1] - a.bucket[1]) <= steps


def test_exact_bucket_size_is_used_unchanged():
    a = assign_bucket((384, 640), (512, 512), enable_bucket=True)
    assert a.bucket == (384, 640) and a.resized_size == (384, 640) and a.crop_ltrb == (0, 0, 384, 640)


@pytest.mark.parametrize("reso,lo,hi,steps", CONFIGS)
def test_no_upscale_never_upscales(reso, lo, hi, steps):
    manager = BucketManager(reso, True, lo, hi, steps, bucket_no_upscale=True)
    for w, h in random_sizes(400, seed=1):
        try:
            a = manager.assign((w, h))
        except UserError as e:
            assert "bucket_reso_steps" in str(e)
            assert min(w, h) * min(1.0, (reso[0] * reso[1] / (w * h)) ** 0.5, hi / max(w, h)) < steps + 1
            continue
        (bw, bh), (rw, rh), (l, t, r, b) = a.bucket, a.resized_size, a.crop_ltrb
        assert rw <= w and rh <= h
        assert bw % steps == 0 and bh % steps == 0 and max(bw, bh) <= hi
        assert bw * bh <= reso[0] * reso[1]
        assert 0 <= rw - bw < steps and 0 <= rh - bh < steps  # a few pixels, on each axis
        assert 0 <= l and 0 <= t and r <= rw and b <= rh and (r - l, b - t) == (bw, bh)
        if w * h <= reso[0] * reso[1] and max(w, h) <= hi:
            assert (rw, rh) == (w, h)  # small enough: only cropped to the step grid


def test_no_upscale_small_image_keeps_its_size():
    a = assign_bucket((300, 200), (512, 512), enable_bucket=True, bucket_no_upscale=True)
    assert a.resized_size == (300, 200) and a.bucket == (256, 192) and a.crop_ltrb == (22, 4, 278, 196)


def test_no_upscale_image_thinner_than_a_step_is_an_error():
    with pytest.raises(UserError, match="bucket_reso_steps=64"):
        assign_bucket((40, 900), (512, 512), bucket_no_upscale=True)


def test_without_bucketing_every_image_gets_the_fixed_resolution():
    manager = BucketManager((512, 768), enable_bucket=False)
    for w, h in random_sizes(100, seed=2):
        a = manager.assign((w, h))
        (rw, rh), (l, t, r, b) = a.resized_size, a.crop_ltrb
        assert a.bucket == (512, 768)
        assert rw >= 512 and rh >= 768 and min(rw - 512, rh - 768) == 0
        assert (l, t) == ((rw - 512) // 2, (rh - 768) // 2) and (r, b) == (l + 512, t + 768)


def test_format_bucket_table_lists_buckets_and_total():
    text = format_bucket_table({(512, 512): 3, (384, 640): 2, (640, 384): 5})
    lines = text.splitlines()
    assert "384x640" in lines[1] and "512x512" in lines[2] and "640x384" in lines[3]  # tall to wide
    assert lines[-1].split()[-1] == "10" and "3 buckets" in lines[-1]
    assert format_bucket_table({}) == "no buckets (no images)"


def epoch_items(n_images: int, repeats: int, seed: int = 0):
    """Image i listed `repeats` times, as the dataset does; returns (image ids, buckets)."""
    manager = BucketManager((512, 512), True, 256, 1024, 64)
    sizes = random_sizes(n_images, seed)[:n_images]
    images = [i for i in range(n_images) for _ in range(repeats)]
    return images, [manager.assign(sizes[i]).bucket for i in images]


@pytest.mark.parametrize("rng_factory", [random.Random, np.random.default_rng])
@pytest.mark.parametrize("repeats,batch_size", [(1, 1), (3, 4), (5, 3)])
def test_batches_hold_one_bucket_and_every_image_num_repeats_times(rng_factory, repeats, batch_size):
    images, buckets = epoch_items(37, repeats)
    batches = make_bucket_batches(buckets, batch_size, rng_factory(7))
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(buckets)))  # every item exactly once
    assert Counter(images[i] for i in flat) == {img: repeats for img in range(37)}
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({buckets[i] for i in batch}) == 1
    # only each bucket's last batch may be short
    short = Counter(buckets[b[0]] for b in batches if len(b) < batch_size)
    assert all(n == 1 for n in short.values())
    assert batches == make_bucket_batches(buckets, batch_size, rng_factory(7))  # deterministic
    assert batches != make_bucket_batches(buckets, batch_size, rng_factory(8))


def test_batches_without_shuffle_follow_bucket_then_input_order():
    buckets = [(512, 512), (384, 640), (512, 512), (384, 640), (512, 512)]
    assert make_bucket_batches(buckets, 2, shuffle=False) == [[1, 3], [0, 2], [4]]
    with pytest.raises(ValueError):
        make_bucket_batches(buckets, 2)  # shuffling needs an rng


@pytest.mark.parametrize("shape, size", [
    ((1000, 1000), (1024, 1024)), ((1600, 1200), (1152, 896)), ((1500, 1000), (1216, 832)),
    ((1920, 1080), (1344, 768)), ((2100, 900), (1536, 640)), ((1080, 1920), (768, 1344)),
])
def test_generation_size_picks_the_sdxl_bucket_of_the_guide_shape(shape, size):
    """Left open, the size is the bucket the shape trains in: at 1024² the published SDXL sizes."""
    assert generation_size(0, 0, 1024, shape) == size


def test_generation_size_keeps_given_sides_and_the_native_area():
    assert generation_size(576, 832, 1024, (1000, 1000)) == (576, 832)  # both given: used as given
    assert generation_size(0, 0, 512, None) == (512, 512)  # no reference: the native square
    assert generation_size(1216, 0, 1024) == (1216, 832)  # one given: the other keeps about 1024²
    assert generation_size(0, 768, 512) == (320, 768)
