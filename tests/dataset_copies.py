"""Small training sets copied from the shared prepared dataset (whose files no test may change)."""
from __future__ import annotations

import shutil
from pathlib import Path

from library.data.features import feature_cache_path


def small_dataset_copy(prepared_dataset: Path, folder: Path, count: int) -> Path:
    """A dataset TOML over copies of the first `count` prepared images (their caches stay valid)."""
    source = Path(prepared_dataset.read_text().split('image_dir = "')[1].split('"')[0])
    images = folder / "images"
    images.mkdir(parents=True)
    for image in sorted(p for p in source.iterdir() if p.suffix in (".png", ".jpg"))[:count]:
        shutil.copy2(image, images / image.name)  # same size and mtime: its cache stays valid
        shutil.copy2(feature_cache_path(image, None), feature_cache_path(images / image.name, None))
    toml = folder / "d.toml"
    general = prepared_dataset.read_text().split("[[datasets]]")[0]
    toml.write_text(general + f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n')
    return toml


def one_bucket_dataset(prepared_dataset: Path, folder: Path, count: int, batch_size: int, same_image: bool = False) -> Path:
    """A dataset TOML over `count` prepared images in one 64 px bucket (no bucketing), so that an
    epoch is exactly ceil(count / batch_size) batches. With `same_image`, all are copies of the
    first image (and of its caption and cache): every sample is the same sample."""
    source = Path(prepared_dataset.read_text().split('image_dir = "')[1].split('"')[0])
    originals = sorted(p for p in source.iterdir() if p.suffix in (".png", ".jpg"))
    images = folder / "images"
    images.mkdir(parents=True)
    for i in range(count):
        image = originals[0 if same_image else i]
        copy = images / f"{i:03d}{image.suffix}"
        shutil.copy2(image, copy)  # same size and mtime: its cache stays valid
        shutil.copy2(feature_cache_path(image, None), feature_cache_path(copy, None))
        if image.with_suffix(".txt").is_file():
            shutil.copy2(image.with_suffix(".txt"), copy.with_suffix(".txt"))
    toml = folder / "d.toml"
    toml.write_text(f'[general]\nresolution = 64\nbatch_size = {batch_size}\ncaption_extension = ".txt"\n\n'
                    f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n')
    return toml
