"""Images/s of prepare_features.py against the bare onnxruntime ceiling.

    python bench/bench_features.py [--num_images 256] [--batch_size 32] [--image_size 768x512] [--device cpu|cuda]

"bare": InferenceSession.run on batches preprocessed beforehand (model time only: the ceiling).
"pipeline": library.prepare.pipeline.extract_features, the code path prepare_features.py runs — decoding
and WD preprocessing in threads, batching, inference, atomic npz writes — over the same JPEGs.
"end-to-end": prepare_features.main (also loads the model and lists and checks the caches).
"decode only": the pipeline's decoding + preprocessing threads alone (no model, no writes): the
other ceiling. The pipeline cannot beat min(bare, decode only); on few CPU cores with a tiny model
the JPEG decode and the 448² bicubic resize, not the model, set the pace.
Each figure is the best of --repeats runs; "CPU ms/img" is the process CPU time of that run per
image (all threads), which a loaded machine inflates far less than it inflates wall time. The tagger is the tiny offline one unless --tagger_model
names another (e.g. a real-size ViT-B export).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import prepare_features  # noqa: E402  (the end-to-end measurement runs its main)
from library.models.image_encoders import load_encoder  # noqa: E402
from library.prepare.pipeline import extract_features, load_and_preprocess  # noqa: E402
from library.prepare.settings import DEFAULT_WORKERS  # noqa: E402
from library.data.features import feature_cache_path  # noqa: E402
from library.data.images import load_image, prefetch  # noqa: E402
from tools.make_tiny_tagger import build_tiny_tagger  # noqa: E402


def make_images(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """Photo-like JPEGs (smooth gradients plus mild noise, so decoding costs what real files cost)."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        base = np.stack([np.sin(xx / (20 + 7 * c + i % 13)) * np.cos(yy / (25 + 5 * c)) for c in range(3)], -1)
        arr = np.clip(127 + 100 * base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def best_of(repeats: int, fn, setup=lambda: None) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the fastest of `repeats` runs."""
    runs = []
    for _ in range(repeats):
        setup()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - start, time.process_time() - cpu))
    return min(runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", default="768x512", help="WxH of the generated JPEGs")
    p.add_argument("--num_workers", type=int, default=DEFAULT_WORKERS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tagger_model", default=None, help="default: the tiny offline vit-v2 tagger")
    p.add_argument("--work_dir", type=Path, default=None, help="default: a temporary folder")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.image_size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        tagger = args.tagger_model or str(build_tiny_tagger(work / "tiny-tagger", seed=0))
        images = make_images(work / f"images-{size[0]}x{size[1]}", args.num_images, size)
        encoder = load_encoder(tagger, device=args.device)
        n = len(images)

        # bare ceiling: the same session, the same preprocessed batches, nothing else
        arrays = np.stack([encoder.preprocess(load_image(path)) for path in images])
        batches = [arrays[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
        feed = encoder.input_name
        session = encoder.session
        session.run([encoder.feature_name], {feed: batches[0]})  # warm-up
        bare = best_of(args.repeats, lambda: [session.run([encoder.feature_name], {feed: b}) for b in batches])

        def clear() -> None:
            for path in images:
                feature_cache_path(path).unlink(missing_ok=True)

        jobs = [(path, feature_cache_path(path)) for path in images]
        pipeline = best_of(args.repeats, lambda: extract_features(
            encoder, jobs, args.batch_size, args.num_workers, progress=False), clear)
        decode = best_of(args.repeats, lambda: sum(1 for _ in prefetch(
            images, lambda path: load_and_preprocess(encoder, path), args.num_workers, 2 * args.batch_size)))
        argv_main = ["--train_data_dir", str(images[0].parent), "--tagger_model", tagger, "--device", args.device,
                     "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers)]
        end_to_end = best_of(1, lambda: prepare_features.main(argv_main), clear)

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"\n{n} images {size[0]}x{size[1]} JPEG, batch {args.batch_size}, {args.num_workers} decode threads, "
          f"OMP_NUM_THREADS={threads}, {encoder.provider}, encoder {encoder.encoder_id} (D={encoder.dim}, input {encoder.size}), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<12} {'images/s':>10} {'of bare':>8} {'CPU ms/img':>11}")
    for name, (seconds, cpu) in (("bare", bare), ("decode only", decode), ("pipeline", pipeline), ("end-to-end", end_to_end)):
        print(f"{name:<12} {n / seconds:>10.1f} {bare[0] / seconds:>8.2f} {1e3 * cpu / n:>11.2f}")
    # Every image costs the pipeline its decode as well as its inference: on C otherwise idle cores
    # it reaches at best C / (its CPU per image) images/s, whatever the overlap.
    cores = os.cpu_count() or 1
    print(f"the pipeline spends {pipeline[1] / bare[1]:.1f}x the CPU per image of bare; on {cores} idle cores "
          f"it could reach at most {cores * bare[0] / pipeline[1]:.2f} of bare")
    return 0


if __name__ == "__main__":
    sys.exit(main())
