"""Prepare PFG features: run the image encoder (a WD tagger by default) over the training images
and write one `<stem>_pfg.npz` per image (see library/features.py for the keys).

    python prepare_features.py --train_data_dir IMAGES --tagger_model TAGGER
    python prepare_features.py --dataset_config DATASET.toml --tagger_model TAGGER [--batch_size 32] [--device cuda]

Resumable: images whose cache is still valid are skipped. Broken images are reported one line
each and skipped; the exit status is 1 when any failed. Under `accelerate launch` (or torchrun)
each process takes its own share of the images.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from library.dataset_config import SubsetConfig, config_from_train_data_dir, load_dataset_config
from library.encoders import ImageEncoder, load_encoder
from library.errors import UserError, run_cli
from library.features import feature_cache_path, load_valid_feature, save_feature
from library.images import IMAGE_EXTENSIONS, ImageLoadError, list_images, load_image, prefetch


T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    image: Path
    cache: Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Write the PFG feature cache (<stem>_pfg.npz) for training images.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--train_data_dir", type=Path, help="folder of training images (kohya's <repeats>_<name> subfolders work too)")
    src.add_argument("--dataset_config", type=Path, help="kohya-style dataset TOML; every subset's image_dir is processed")
    p.add_argument("--tagger_model", required=True, help="WD tagger folder (model.onnx + selected_tags.csv), .onnx file or hub id")
    p.add_argument("--feature_tensor", default=None, help="name of the graph tensor to use as the feature (default: found automatically)")
    p.add_argument("--cache_dir", type=Path, default=None, help="write caches here instead of beside the images (--train_data_dir only; train with a dataset TOML whose subsets set the same cache_dir)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when onnxruntime has it)")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding threads")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_workers < 1:
        raise UserError(f"--num_workers must be at least 1, got {args.num_workers}")
    if args.cache_dir is not None and args.dataset_config is not None:
        raise UserError("--cache_dir applies to --train_data_dir; with --dataset_config set cache_dir in the subsets")
    return args


def dataset_subsets(args: argparse.Namespace) -> list[SubsetConfig]:
    """The subsets the trainer will read, from the same loader, so every image it uses gets a cache."""
    if args.dataset_config is not None:
        config = load_dataset_config(args.dataset_config)
    else:
        config = config_from_train_data_dir(args.train_data_dir)
    return [subset for dataset in config.datasets for subset in dataset.subsets]


def collect_jobs(subsets: list[SubsetConfig], cache_dir: Path | None) -> list[Job]:
    jobs: list[Job] = []
    for subset in subsets:
        folder = cache_dir or subset.cache_dir
        images = list_images(subset.image_dir)
        if not images:
            print(f"warning: no images in {subset.image_dir} ({subset.name})")
        jobs += [Job(p, feature_cache_path(p, folder)) for p in images]
    if not jobs:
        raise UserError("no images found (extensions: " + " ".join(IMAGE_EXTENSIONS) + ")")
    return jobs


def check_expected_encoder(subsets: list[SubsetConfig], encoder_id: str) -> None:
    """A subset may pin the encoder its caches must come from; a different tagger is a mistake."""
    for subset in subsets:
        if subset.encoder is not None and subset.encoder != encoder_id:
            raise UserError(f"{subset.name} sets encoder = {subset.encoder!r}, but --tagger_model is {encoder_id!r}")


def split_duplicates(jobs: list[Job]) -> tuple[list[Job], list[tuple[Job, str]]]:
    """Images sharing a cache path (a.png and a.jpg) would overwrite each other: refuse both."""
    owners: dict[Path, list[Job]] = {}
    for job in jobs:
        owners.setdefault(job.cache, []).append(job)
    unique = [j for j in jobs if len(owners[j.cache]) == 1]
    clashes = [(j, f"shares the cache file {j.cache.name} with {', '.join(o.image.name for o in owners[j.cache] if o is not j)}")
               for j in jobs if len(owners[j.cache]) > 1]
    return unique, clashes


def process_share(items: list[T]) -> list[T]:
    """Under accelerate launch / torchrun, each process takes every WORLD_SIZE-th item."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return items[rank::world]


def default_device() -> str:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def load_and_preprocess(encoder: ImageEncoder, path: Path) -> np.ndarray:
    image = load_image(path)
    try:
        return encoder.preprocess(image)
    except Exception as e:  # an odd image that decoded but cannot be converted is still one bad file
        raise ImageLoadError(path, f"cannot preprocess ({e})") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    subsets = dataset_subsets(args)
    jobs, clashes = split_duplicates(collect_jobs(subsets, args.cache_dir))  # before sharing: clashes span processes
    jobs, clashes = process_share(jobs), process_share(clashes)
    encoder = load_encoder(args.tagger_model, device=args.device or default_device(), feature_tensor=args.feature_tensor)
    check_expected_encoder(subsets, encoder.encoder_id)

    todo = [j for j in jobs if load_valid_feature(j.cache, encoder.encoder_id, j.image) is None]
    skipped, done, failed = len(jobs) - len(todo), 0, len(clashes)
    print(f"{len(jobs) + len(clashes)} images, {skipped} with a valid cache, {len(todo)} to encode with {encoder.encoder_id} (D={encoder.dim})")
    for job, reason in clashes:
        print(f"failed: {job.image}: {reason}")

    def write(batch: list[tuple[Job, np.ndarray]]) -> None:
        nonlocal done, failed
        if not batch:
            return
        vectors = encoder.encode_batch(np.stack([arr for _, arr in batch]))
        for (job, _), vector in zip(batch, vectors):
            try:
                save_feature(job.cache, vector, encoder.encoder_id, job.image)
                done += 1
            except OSError as e:
                failed += 1
                tqdm.write(f"failed: {job.image}: cannot write {job.cache} ({e})")
        batch.clear()

    batch: list[tuple[Job, np.ndarray]] = []
    with tqdm(total=len(todo), unit="img", smoothing=0.05, disable=not todo) as bar:
        stream = prefetch(todo, lambda j: load_and_preprocess(encoder, j.image), args.num_workers, 2 * args.batch_size)
        for job, array, error in stream:
            if error is not None:
                failed += 1
                tqdm.write(f"failed: {error.path}: {error.reason}")
            else:
                batch.append((job, array))
                if len(batch) == args.batch_size:
                    write(batch)
            bar.update(1)
        write(batch)

    print(f"done: {done} written, {skipped} skipped (valid cache), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
