"""The feature pipeline: image files -> encoder vectors -> `<stem>_pfg.npz` caches (and tag
captions), with decoding, inference and writing overlapped so the encoder is never left waiting.

    summary = extract_features(encoder, [(image, cache path), ...], batch_size=32, num_workers=8)
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
from tqdm import tqdm

from library.data.features import save_feature
from library.data.images import ImageLoadError, load_image, prefetch
from library.data.tags import CaptionWriter
from library.models.image_encoders import ImageEncoder


class Job(NamedTuple):
    """One image and the cache file its vector goes to."""

    image: Path
    cache: Path


@dataclass
class Summary:
    """What a pipeline run did, for the report at the end."""

    done: int = 0
    failed: int = 0
    captions_written: int = 0
    captions_kept: int = 0
    failed_images: set[Path] = field(default_factory=set)



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
    num_workers: int = 4,
    captions: CaptionWriter | None = None,
    progress: bool = True,
    on_written=None,
) -> Summary:
    """Encode (image, cache path) jobs in batches and write each cache (and caption) atomically;
    `on_written(job, vector)` hears of each cache written (the folder index records it).

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

    def save(batch_jobs: list[Job], vectors: np.ndarray, probs: np.ndarray | None) -> list[tuple[Job, str | None, bool, np.ndarray]]:
        """Runs in the writer thread; returns (job, error, caption written, vector) for the main thread."""
        results = []
        for k, job in enumerate(batch_jobs):
            try:
                save_feature(job.cache, vectors[k], encoder.encoder_id, job.image)
                results.append((job, None, captions is not None and captions.write(job.image, probs[k]), vectors[k]))
            except OSError as e:
                results.append((job, f"cannot write its cache or caption ({e})", False, vectors[k]))
        return results

    def collect(results: list[tuple[Job, str | None, bool, np.ndarray]]) -> None:
        for job, error, caption_written, vector in results:
            if error is not None:
                fail(job.image, error)
                continue
            if on_written is not None:
                on_written(job, vector)
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
        with tqdm(total=len(jobs), desc="encoding", unit=" images", smoothing=0.05, disable=not progress or not jobs,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}, {remaining} left]") as bar:
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
