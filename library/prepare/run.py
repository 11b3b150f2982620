"""One prepare job, as prepare_features.py runs it and as train_pfg.py --tagger_model runs it
before training: the dataset's images -> valid feature caches (and tag captions, latent caches).

Resumable: images whose caches are still valid are skipped, known from each folder's index
(library.data.index) without opening the caches, so a rerun over a finished folder takes seconds.
Broken images are reported one line each and skipped; the result is 1 when any failed. Under
`accelerate launch` (or torchrun) each process takes its own share of the images (RANK /
WORLD_SIZE); the first process of each node writes the indexes.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TypeVar

import numpy as np

from library.data.dataset_config import DatasetConfig, DatasetDefaults, SubsetConfig, config_from_train_data_dir, load_dataset_config
from library.data.dataset import indexed_images
from library.data.features import feature_cache_path, read_cache
from library.data.images import IMAGE_EXTENSIONS
from library.data.index import DatasetIndex, FolderIndex
from library.data.tags import CaptionWriter, load_tag_list
from library.errors import UserError
from library.models.image_encoders import ImageEncoder, detect_encoder_kind, load_encoder
from library.prepare.pipeline import Job, extract_features
from library.prepare.settings import PrepareSettings

T = TypeVar("T")


def prepare_features(settings: PrepareSettings, config: DatasetConfig | None = None, index: DatasetIndex | None = None) -> int:
    """Run the job; 0 when every image has its caches, 1 when some failed (each reported). `config`
    is the dataset as train_pfg.py resolved it (its command-line fallbacks), else it is loaded here;
    `index` is train_pfg.py's, so the vectors written here are recorded where training reads them."""
    config = config or load_config(settings)
    subsets = [subset for _, subset in config.iter_subsets()]
    index = index if index is not None else DatasetIndex(main=os.environ.get("LOCAL_RANK", "0") == "0")
    folders: dict[Path, FolderIndex] = {}  # image -> its folder's index
    jobs, clashes = split_duplicates(collect_jobs(subsets, index, folders))  # before sharing: clashes span processes
    jobs, clashes = process_share(jobs), process_share(clashes)
    kind = detect_encoder_kind(settings.tagger_model) if settings.encoder == "auto" else settings.encoder
    if settings.write_tags and kind == "clip":
        raise UserError("--write_tags needs a WD tagger; a CLIP vision model has no tags")
    encoder = load_encoder(settings.tagger_model, device=settings.device or default_device(kind),
                           feature_tensor=settings.feature_tensor or None, kind=kind)
    check_expected_encoder(subsets, encoder.encoder_id)
    captions = caption_writer(settings, encoder) if settings.write_tags else None

    def needs_run(job: Job) -> bool:
        if captions is not None and captions.wanted(job.image):
            return True  # the tags come from the forward pass, so a missing caption means running it
        try:
            record = folders[job.image].feature(job.image, job.cache, read_cache)
        except UserError:  # unreadable: recompute it
            return True
        return record is None or not (record.encoder_id == encoder.encoder_id and record.current and record.finite)

    def written(job: Job, vector: np.ndarray) -> None:
        folders[job.image].record_feature(job.image, job.cache, encoder.encoder_id, vector)

    todo = [j for j in jobs if needs_run(j)]
    skipped = len(jobs) - len(todo)
    rank, world = process_rank()
    share = f" in the share of process {rank} of {world}" if world > 1 else ""
    print(f"{len(jobs) + len(clashes)} images{share}, {skipped} with a valid cache, {len(todo)} to encode with {encoder.encoder_id} (D={encoder.dim})")
    for job, reason in clashes:
        print(f"failed: {job.image}: {reason}")
    summary = extract_features(encoder, todo, settings.batch_size, settings.num_workers, captions, on_written=written)
    index.save()
    failed = summary.failed + len(clashes)
    print(f"done: {summary.done} written, {skipped} skipped (valid cache), {failed} failed")
    if captions is not None:
        print(f"captions: {summary.captions_written} written, {summary.captions_kept} kept (existing files are kept unless --overwrite_captions)")
    if settings.cache_latents:
        from library.prepare.latent_files import cache_latent_files

        skip = summary.failed_images | {job.image for job, _ in clashes}
        cached, latent_failed = cache_latent_files(config, settings.pretrained_model_name_or_path, latent_device(settings),
                                                   settings.vae_batch_size, skip, process_share, index)
        failed += latent_failed
        print(f"latents: {cached} images have valid caches, {latent_failed} failed")
    return 1 if failed else 0


def load_config(settings: PrepareSettings) -> DatasetConfig:
    """The dataset the trainer will read, from the same loader, so every image it uses gets a cache.
    `--cache_dir` and `--recursive` (with --train_data_dir) become the subsets' own settings."""
    defaults = DatasetDefaults(resolution=settings.resolution_wh)
    if settings.dataset_config:
        return load_dataset_config(settings.dataset_config, defaults)
    config = config_from_train_data_dir(settings.train_data_dir, defaults, settings.reg_data_dir, settings.in_json)
    cache_dir = Path(os.path.abspath(settings.cache_dir)) if settings.cache_dir else None
    datasets = []
    for dataset in config.datasets:
        subsets = [dataclasses.replace(subset, cache_dir=cache_dir or subset.cache_dir) for subset in dataset.subsets]
        if settings.recursive:
            subsets = [folder for subset in subsets for folder in subfolder_subsets(subset)]
        datasets.append(dataclasses.replace(dataset, subsets=tuple(subsets)))
    return dataclasses.replace(config, datasets=tuple(datasets))


def subfolder_subsets(subset: SubsetConfig) -> list[SubsetConfig]:
    """`--recursive` (kohya's tagger flag): the subset's folder and every folder below it that holds
    images, each a subset of its own with the same settings (hidden folders left out)."""
    found = []
    for folder, children, files in os.walk(subset.image_dir):
        children[:] = sorted(c for c in children if not c.startswith("."))
        if not any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in files):
            continue
        relative = Path(folder).relative_to(subset.image_dir)
        name = subset.name if relative == Path(".") else f"{subset.name} > {relative.as_posix()}"
        found.append(dataclasses.replace(subset, image_dir=Path(folder), name=name))
    return found


def collect_jobs(subsets: list[SubsetConfig], index: DatasetIndex, folders: dict[Path, FolderIndex]) -> list[Job]:
    """Every image of the subsets with its cache path, listed through the folder indexes as
    training lists them (a metadata_file's entries through the index of the folder each is in)."""
    jobs: list[Job] = []
    for subset in subsets:
        images, missing = indexed_images(subset, index)
        for error in missing:
            print(f"skipped {error.path}: {error.reason}")
        if not images:
            print(f"warning: no images in {subset.metadata_file or subset.image_dir} ({subset.name})")
        for image, _ in images:  # unreadable ones too: their decode reports them
            folders[image.path] = index.folder(image.path.parent, subset.cache_dir)
            jobs.append(Job(image.path, feature_cache_path(image.path, subset.cache_dir)))
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


def local_cuda() -> str:
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def default_device(kind: str) -> str:
    """The encoder's device when --device is not given: this process's GPU when there is one."""
    if kind == "clip":
        import torch

        return local_cuda() if torch.cuda.is_available() else "cpu"
    import onnxruntime as ort

    return local_cuda() if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def latent_device(settings: PrepareSettings) -> str:
    import torch

    return settings.device or (local_cuda() if torch.cuda.is_available() else "cpu")


def caption_writer(settings: PrepareSettings, encoder: ImageEncoder) -> CaptionWriter:
    from library.models.image_encoders.wd_tagger import OnnxTagger

    if not isinstance(encoder, OnnxTagger) or encoder.probs_name is None:
        raise UserError(f"--write_tags needs a WD tagger with its tag probabilities output; {encoder.encoder_id} has none")
    writer = CaptionWriter(load_tag_list(encoder.tags_csv), settings.tag_threshold, settings.character_threshold,
                           settings.include_rating, settings.caption_extension, settings.overwrite_captions)
    _, probs = encoder.encode_with_probs(np.zeros((1, *encoder.item_shape), np.float32))
    writer.check_width(probs.shape[1], encoder.encoder_id)
    return writer
