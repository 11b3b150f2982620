"""Prepare PFG features: run the image encoder (a WD tagger by default) over the training images
and write one `<stem>_pfg.npz` per image (see library/data/features.py for the keys).

    python prepare_features.py --train_data_dir IMAGES --tagger_model TAGGER
    python prepare_features.py --dataset_config DATASET.toml --tagger_model TAGGER [--batch_size 32] [--device cuda]
        [--write_tags] [--cache_latents --pretrained_model_name_or_path SD]

`--tagger_model` names the image encoder: a WD tagger (folder with model.onnx + selected_tags.csv,
a bare .onnx, or a hub id) or a CLIP vision model (a transformers save_pretrained folder, or a hub
id with `--encoder clip`). `--encoder auto` (default) tells local models apart by their files.

`--write_tags` writes kohya-style `<stem>.txt` tag captions from the same WD forward pass.
`--cache_latents` also writes the trainer's latent caches (`<stem>_WWWWxHHHH_sd.npz`), bucketed
from the same dataset config, which `train_pfg.py --cache_latents_to_disk` then reuses.

Resumable: images whose caches are still valid are skipped. Broken images are reported one line
each and skipped; the exit status is 1 when any failed. Under `accelerate launch` (or torchrun)
each process takes its own share of the images.
"""
from __future__ import annotations

import argparse
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, TypeVar

import numpy as np
from tqdm import tqdm

from library.data.dataset_config import DatasetConfig, DatasetDefaults, SubsetConfig, config_from_train_data_dir, load_dataset_config, parse_resolution
from library.models.image_encoders import ENCODER_KINDS, ImageEncoder, detect_encoder_kind, load_encoder
from library.models.image_encoders.wd_tagger import OnnxTagger
from library.errors import UserError, run_cli
from library.data.features import feature_cache_path, load_valid_feature, save_feature
from library.data.images import IMAGE_EXTENSIONS, ImageLoadError, list_images, load_image, prefetch
from library.data.tags import CaptionWriter, load_tag_list

T = TypeVar("T")
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


class Job(NamedTuple):
    image: Path
    cache: Path


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    captions_written: int = 0
    captions_kept: int = 0
    failed_images: set[Path] = field(default_factory=set)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Write the PFG feature cache (<stem>_pfg.npz) for training images; optionally tag captions and latent caches.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--train_data_dir", type=Path, help="folder of training images (kohya's <repeats>_<name> subfolders work too)")
    src.add_argument("--dataset_config", type=Path, help="kohya-style dataset TOML; every subset's image_dir is processed")
    enc = p.add_argument_group("image encoder")
    enc.add_argument("--tagger_model", required=True,
                     help="the image encoder: WD tagger folder (model.onnx + selected_tags.csv), .onnx file or hub id; "
                          "or a CLIP vision folder (config.json + safetensors, from save_pretrained) or hub id")
    enc.add_argument("--encoder", default="auto", choices=ENCODER_KINDS,
                     help="wd: ONNX WD tagger (pooled pre-classifier vector); clip: transformers CLIPVisionModelWithProjection "
                          "(projected image embedding); auto: clip for a folder with config.json and no .onnx, else wd "
                          "(hub ids are wd unless --encoder clip)")
    enc.add_argument("--feature_tensor", default=None, help="WD only: name of the graph tensor to use as the feature (default: found automatically)")
    enc.add_argument("--batch_size", type=int, default=32)
    enc.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    enc.add_argument("--num_workers", type=int, default=DEFAULT_WORKERS, help="image decoding threads")
    p.add_argument("--cache_dir", type=Path, default=None, help="write caches here instead of beside the images (--train_data_dir only; train with a dataset TOML whose subsets set the same cache_dir)")
    tags = p.add_argument_group("tag captions (WD taggers)")
    tags.add_argument("--write_tags", action="store_true", help="write kohya-style tag captions from the same forward pass")
    tags.add_argument("--tag_threshold", type=float, default=0.35, help="probability threshold of general tags")
    tags.add_argument("--character_threshold", type=float, default=0.85, help="probability threshold of character tags")
    tags.add_argument("--include_rating", action="store_true", help="start each caption with the most likely rating tag")
    tags.add_argument("--caption_extension", default=".txt", help="caption file extension (set the same caption_extension in the dataset TOML)")
    tags.add_argument("--overwrite_captions", action="store_true", help="replace existing caption files (default: keep them)")
    lat = p.add_argument_group("latent caches (for train_pfg.py --cache_latents_to_disk)")
    lat.add_argument("--cache_latents", action="store_true", help="also write the VAE latent caches at each image's bucket resolution")
    lat.add_argument("--pretrained_model_name_or_path", default=None, help="the SD model whose VAE encodes the latents (diffusers folder, single file or hub id)")
    lat.add_argument("--resolution", default="512", help="training resolution 'W' or 'W,H' where the dataset TOML sets none (as train_pfg.py --resolution)")
    lat.add_argument("--vae_batch_size", type=int, default=8)
    args = p.parse_args(argv)
    for name in ("batch_size", "num_workers", "vae_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.cache_dir is not None and args.dataset_config is not None:
        raise UserError("--cache_dir applies to --train_data_dir; with --dataset_config set cache_dir in the subsets")
    if args.cache_latents and not args.pretrained_model_name_or_path:
        raise UserError("--cache_latents needs --pretrained_model_name_or_path (the SD model whose VAE the trainer uses)")
    for name in ("tag_threshold", "character_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name} must be within [0, 1], got {getattr(args, name)}")
    if not args.caption_extension.startswith("."):
        raise UserError(f"--caption_extension must start with a dot, got {args.caption_extension!r}")
    try:
        args.resolution = parse_resolution(args.resolution)
    except ValueError as e:
        raise UserError(f"--resolution: {e}") from None
    return args


def load_config(args: argparse.Namespace) -> DatasetConfig:
    """The dataset the trainer will read, from the same loader, so every image it uses gets a cache."""
    defaults = DatasetDefaults(resolution=args.resolution)
    if args.dataset_config is not None:
        return load_dataset_config(args.dataset_config, defaults)
    return config_from_train_data_dir(args.train_data_dir, defaults)


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


def process_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as accelerate launch / torchrun set them; (0, 1) in a plain run."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise UserError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} must be integers") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def process_share(items: list[T]) -> list[T]:
    """Under accelerate launch / torchrun, each process takes every WORLD_SIZE-th item."""
    rank, world = process_rank()
    return items[rank::world]


def default_device(kind: str) -> str:
    local = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if kind == "clip":
        import torch

        return local if torch.cuda.is_available() else "cpu"
    import onnxruntime as ort

    return local if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def caption_writer(args: argparse.Namespace, encoder: ImageEncoder) -> CaptionWriter:
    if not isinstance(encoder, OnnxTagger) or encoder.probs_name is None:
        raise UserError(f"--write_tags needs a WD tagger with its tag probabilities output; {encoder.encoder_id} has none")
    writer = CaptionWriter(load_tag_list(encoder.tags_csv), args.tag_threshold, args.character_threshold,
                           args.include_rating, args.caption_extension, args.overwrite_captions)
    _, probs = encoder.encode_with_probs(np.zeros((1, *encoder.item_shape), np.float32))
    writer.check_width(probs.shape[1], encoder.encoder_id)
    return writer


def load_and_preprocess(encoder: ImageEncoder, path: Path, out: np.ndarray | None = None) -> np.ndarray:
    image = load_image(path)
    try:
        return encoder.preprocess(image, out)
    except (ValueError, OSError) as e:  # an odd image that decoded but cannot be converted is still one bad file
        raise ImageLoadError(path, f"cannot preprocess ({e})") from None


def extract_features(
    encoder: ImageEncoder,
    jobs: Iterable[tuple[Path, Path]],
    batch_size: int = 32,
    num_workers: int = DEFAULT_WORKERS,
    captions: CaptionWriter | None = None,
    progress: bool = True,
) -> Summary:
    """Encode (image, cache path) jobs in batches and write each cache (and caption) atomically.

    Three stages overlap: `num_workers` threads decode and preprocess up to two batches ahead, the
    calling thread runs the model, and one writer thread saves the previous batch's files (a
    cache write costs a few ms of file-system calls, as much as inference of a small tagger). A
    bad image is reported on one line and counted, never fatal.

    The threads preprocess straight into reusable batch arrays: image i of the stream is row
    i % batch_size of buffer (i // batch_size) % len(buffers). The workers run at most `ahead`
    images past the one the model thread waits for, so with ahead / batch_size + 1 buffers a buffer
    is refilled only after its batch has run. The model thread never stacks a batch (a copy and a
    fresh 100 MB allocation per batch of 32 at 448², time a GPU would sit idle).
    """
    jobs = [Job(*j) for j in jobs]
    summary = Summary()
    ahead = 2 * batch_size
    buffers = [np.empty((batch_size, *encoder.item_shape), np.float32) for _ in range(ahead // batch_size + 1)]

    def buffer_of(position: int) -> np.ndarray:
        return buffers[(position // batch_size) % len(buffers)]

    def prepare(entry: tuple[int, Job]) -> None:
        position, job = entry
        load_and_preprocess(encoder, job.image, out=buffer_of(position)[position % batch_size])

    def fail(image: Path, reason: str) -> None:
        summary.failed += 1
        summary.failed_images.add(image)
        tqdm.write(f"failed: {image}: {reason}")

    def save(batch_jobs: list[Job], vectors: np.ndarray, probs: np.ndarray | None) -> list[tuple[Job, str | None, bool]]:
        """Runs in the writer thread; returns (job, error, caption written) for the main thread to count."""
        results = []
        for k, job in enumerate(batch_jobs):
            try:
                save_feature(job.cache, vectors[k], encoder.encoder_id, job.image)
                results.append((job, None, captions is not None and captions.write(job.image, probs[k])))
            except OSError as e:
                results.append((job, f"cannot write its cache or caption ({e})", False))
        return results

    def collect(results: list[tuple[Job, str | None, bool]]) -> None:
        for job, error, caption_written in results:
            if error is not None:
                fail(job.image, error)
                continue
            summary.done += 1
            if captions is not None:
                summary.captions_written += caption_written
                summary.captions_kept += not caption_written

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as writer:
        writes: deque[Future] = deque()

        def run(batch_jobs: list[Job], batch: np.ndarray) -> None:
            if captions is not None:
                vectors, probs = encoder.encode_with_probs(batch)
            else:
                vectors, probs = encoder.encode_batch(batch), None
            writes.append(writer.submit(save, batch_jobs, vectors, probs))
            while len(writes) > 1:  # bounded: at most one batch waiting to be written
                collect(writes.popleft().result())

        batch_jobs: list[Job] = []
        rows: list[int] = []
        with tqdm(total=len(jobs), unit="img", smoothing=0.05, disable=not progress or not jobs) as bar:
            for (position, job), _, error in prefetch(enumerate(jobs), prepare, num_workers, ahead):
                if error is not None:
                    fail(error.path, error.reason)
                else:
                    batch_jobs.append(job)
                    rows.append(position % batch_size)
                if batch_jobs and (position % batch_size == batch_size - 1 or position == len(jobs) - 1):
                    buffer = buffer_of(position)
                    # rows 0..n-1 are a view; a failed image leaves a gap, closed by a copy
                    run(batch_jobs, buffer[: len(rows)] if rows[-1] == len(rows) - 1 else buffer[rows])
                    batch_jobs, rows = [], []
                bar.update(1)
            while writes:
                collect(writes.popleft().result())
    return summary


def cache_latent_files(args: argparse.Namespace, config: DatasetConfig, skip: set[Path]) -> tuple[int, int]:
    """Write the trainer's latent caches: the same items, buckets and flip settings as train_pfg.py
    builds, through the same library.data.latents.cache_latents. Returns (cached, failed)."""
    import torch

    from library.data.dataset import collect_items
    from library.data.latents import cache_latents

    items, failures = collect_items(config, pfg_prompt="")
    failed = 0
    for error in failures:
        if error.path not in skip:  # already reported by the feature pass
            print(f"failed: {error.path}: {error.reason}")
            failed += 1
    jobs = [(i.image_path, i.assignment, i.original_size, args.cache_dir or i.subset.cache_dir, i.subset.flip_aug)
            for i in items if i.image_path not in skip]
    jobs = process_share(jobs)
    if not jobs:
        return 0, failed
    device = args.device or ("cuda:" + os.environ.get("LOCAL_RANK", "0") if torch.cuda.is_available() else "cpu")
    vae = load_vae(args.pretrained_model_name_or_path, device)
    chunk = 512  # bounded memory: cache_latents keeps its results until it returns
    start = 0
    while start < len(jobs):
        part = jobs[start : start + chunk]
        try:
            cache_latents(part, vae, to_disk=True, batch_size=args.vae_batch_size)
        except ImageLoadError as e:  # decoded fine for the encoder's header read, fails in full: drop it, go on
            print(f"failed: {e.path}: {e.reason}")
            failed += 1
            jobs = [j for j in jobs if j[0] != e.path]
            continue  # the valid caches just written are reused on the retry
        start += chunk
    return len(jobs), failed


def load_vae(spec: str, device: str):
    """Only the VAE of a diffusers folder (fast); the whole model otherwise. In fp32, as the
    trainer caches latents, since the VAE id (a weight hash) must match the trainer's."""
    from library.models.loading import load_sd_model

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(path / "vae")
        except (OSError, ValueError) as e:
            raise UserError(f"{path / 'vae'}: cannot load the VAE ({e})") from None
    else:
        vae = load_sd_model(spec).vae
    vae.requires_grad_(False).eval()
    return vae.to(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args)
    subsets = [subset for _, subset in config.iter_subsets()]
    jobs, clashes = split_duplicates(collect_jobs(subsets, args.cache_dir))  # before sharing: clashes span processes
    jobs, clashes = process_share(jobs), process_share(clashes)
    kind = detect_encoder_kind(args.tagger_model) if args.encoder == "auto" else args.encoder
    if args.write_tags and kind == "clip":
        raise UserError("--write_tags needs a WD tagger; a CLIP vision model has no tags")
    encoder = load_encoder(args.tagger_model, device=args.device or default_device(kind), feature_tensor=args.feature_tensor, kind=kind)
    check_expected_encoder(subsets, encoder.encoder_id)
    captions = caption_writer(args, encoder) if args.write_tags else None

    def needs_run(job: Job) -> bool:
        if captions is not None and captions.wanted(job.image):
            return True  # the tags come from the forward pass, so a missing caption means running it
        return load_valid_feature(job.cache, encoder.encoder_id, job.image) is None

    todo = [j for j in jobs if needs_run(j)]
    skipped = len(jobs) - len(todo)
    rank, world = process_rank()
    share = f" in the share of process {rank} of {world}" if world > 1 else ""
    print(f"{len(jobs) + len(clashes)} images{share}, {skipped} with a valid cache, {len(todo)} to encode with {encoder.encoder_id} (D={encoder.dim})")
    for job, reason in clashes:
        print(f"failed: {job.image}: {reason}")
    summary = extract_features(encoder, todo, args.batch_size, args.num_workers, captions)
    failed = summary.failed + len(clashes)
    print(f"done: {summary.done} written, {skipped} skipped (valid cache), {failed} failed")
    if captions is not None:
        print(f"captions: {summary.captions_written} written, {summary.captions_kept} kept (existing files are kept unless --overwrite_captions)")
    if args.cache_latents:
        skip = summary.failed_images | {job.image for job, _ in clashes}
        cached, latent_failed = cache_latent_files(args, config, skip)
        failed += latent_failed
        print(f"latents: {cached} images have valid caches, {latent_failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
