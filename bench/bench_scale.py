"""Scale: datasets of 1k-100k images — the start of train_pfg.py, its memory, and saving peaks.

    python bench/bench_scale.py start --work_dir /tmp/scale --sizes 1000 10000 100000
    python bench/bench_scale.py save --variant sd15-size

`start`, per size: synthetic images (tiny, so that 100k are made in minutes), their feature and
latent caches made by prepare_features.py (the time of the first run and of a rerun over the
finished folder; sizes above --encode_up_to copy the smallest size's images and caches, so their
first run checks every cache and writes the index instead of encoding), then train_pfg.py with --cache_latents_to_disk: the first start (which writes
the folder index) and the second, timed from launch to the first optimizer step; peak RSS with
--cache_latents_to_disk and with --cache_latents; RSS and PSS of each process under two
(torchrun, CPU). `--resolutions 64 128` repeats the memory runs at another latent size.

`data`: the data stage of a warm start alone (images listed, vectors loaded, latent caches checked,
with the index in place) over the folders `start` made, in a fresh process: the cost per image
without the imports and model loading that dominate the start of a small run.

`save`: the full single-file save of a model of real size (tools.make_tiny_sd --variant sd15-size
or sdxl-size, random weights) as .safetensors, as the pre-streaming code did it (hash by
serialising the checkpoint in memory), and as .ckpt; each in a fresh process, peak RSS sampled.

Every run is a subprocess; results are printed as the tables in docs/BENCHMARKS.md and written to
WORK_DIR/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# -- memory of running processes --------------------------------------------------------------

def _rollup(pid: int) -> dict[str, int]:
    """Rss and Pss (kB) of a process from /proc (smaps_rollup)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return values


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class Sampler(threading.Thread):
    """Samples the RSS and PSS of a process tree every `every` seconds; keeps each process's peak."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peaks: dict[int, dict[str, int]] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for pid in [self.pid, *_children(self.pid)]:
                for key, value in _rollup(pid).items():
                    peak = self.peaks.setdefault(pid, {})
                    peak[key] = max(peak.get(key, 0), value)
            time.sleep(self.every)

    def stop(self) -> dict[int, dict[str, int]]:
        self.stopped.set()
        self.join()
        return self.peaks


# -- the dataset ----------------------------------------------------------------------------

def make_images(folder: Path, count: int, side: int) -> None:
    """`count` small noisy PNGs (one in three tall, for a second bucket); kept when already there."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".made-{count}-{side}"
    if marker.is_file():
        return
    rng = np.random.default_rng(0)
    for i in range(count):
        shape = (side * 3 // 2, side, 3) if i % 3 == 2 else (side, side, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"img{i:06d}.png", compress_level=1)
    marker.write_text("")


def replicate(base: Path, folder: Path, count: int) -> None:
    """`count` images made by copying the finished `base` folder's images and caches: image i is a
    copy of base image i mod (a multiple of 3 below the base size, so that it keeps its bucket),
    with its bytes and mtime, so the copied caches are valid for it (the same pixels give the same
    vectors and latents). Encoding 100k images on 2 cores would take hours; checking them does not."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".made-{count}-from-{base.name}"
    if marker.is_file():
        return
    originals = sorted(p for p in base.iterdir() if p.suffix == ".png")
    period = len(originals) - len(originals) % 3
    caches: dict[str, list[Path]] = {}
    for path in base.iterdir():
        if path.suffix == ".npz":
            caches.setdefault(path.name[:9], []).append(path)  # "img000123"
    for i in range(count):
        source = originals[i % period]
        stem = f"img{i:06d}"
        shutil.copy2(source, folder / f"{stem}.png")
        for cache in caches.get(source.stem, []):
            shutil.copyfile(cache, folder / (stem + cache.name[9:]))
    marker.write_text("")


def kit(work: Path) -> tuple[Path, Path]:
    """The tiny SD1 model with an even narrower VAE (8 channels: encoding 100k images takes minutes
    on 2 cores, not an hour), and a tagger with a 64 px input (any encoder's vectors are 768
    floats; the model's size is not what is measured here)."""
    import shutil

    from tools.make_tiny_sd import build_tiny_sd, build_vae
    from tools.make_tiny_tagger import TaggerConfig, build_model, tag_rows, write_tagger_folder

    model = work / "bench-sd1"
    if not (model / "vae" / "config.json").is_file():
        shutil.copytree(build_tiny_sd(work / "tiny-sd1", variant="sd1", seed=0), model, dirs_exist_ok=True)
        shutil.rmtree(model / "vae")
        build_vae(0, channels=(8, 8, 8, 8), norm_groups=4).save_pretrained(model / "vae", safe_serialization=True)
    tagger = work / "tagger-64"
    if not (tagger / "model.onnx").is_file():
        cfg = TaggerConfig(image_size=64, patch_size=16, seed=0)
        write_tagger_folder(tagger, build_model(cfg), tag_rows(cfg.num_tags), "bench")
    return model, tagger


def timed(command: list[str], env: dict | None = None, marker: str | None = None) -> dict:
    """Run a command; wall seconds, the seconds until `marker` first appears on stderr, peak RSS/PSS."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(process.pid)
    sampler.start()
    seen: dict[str, float] = {}
    err_lines: list[str] = []

    def read_err() -> None:
        for chunk in iter(lambda: process.stderr.read(256), ""):
            err_lines.append(chunk)
            if marker and "marker" not in seen and re.search(marker, "".join(err_lines[-8:])):
                seen["marker"] = time.perf_counter() - started

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    out = process.stdout.read()
    process.wait()
    reader.join()
    peaks = sampler.stop()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed ({process.returncode}):\n{''.join(err_lines)[-3000:]}\n{out[-2000:]}")
    return {"wall_s": wall, "marker_s": seen.get("marker"), "stdout": out, "peaks": peaks}


def prepare(folder: Path, model: Path, tagger: Path, resolution: int) -> dict:
    command = [sys.executable, "prepare_features.py", "--train_data_dir", str(folder), "--tagger_model", str(tagger),
               "--cache_latents", "--pretrained_model_name_or_path", str(model), "--resolution", str(resolution),
               "--batch_size", "128", "--vae_batch_size", "64"]
    return timed(command)


def train_command(folder: Path, model: Path, out: Path, resolution: int, *extra: str) -> list[str]:
    return ["train_pfg.py", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(folder),
            "--resolution", str(resolution), "--train_batch_size", "16", "--output_dir", str(out), "--output_name", "b",
            "--train_unet", "none", "--pfg_num_tokens", "2", "--optimizer_type", "AdamW", "--max_train_steps", "1", *extra]


FIRST_STEP = r"steps: +100%\|[^\n\r]*1/1"


def bench_start(args) -> dict:
    work = Path(args.work_dir)
    model, tagger = kit(work)
    results: dict = {"sizes": {}}
    for size in args.sizes:
        for resolution in args.resolutions:
            key = f"{size}@{resolution}"
            folder = work / f"data-{size}-{resolution}"
            began = time.perf_counter()
            base = work / f"data-{min(args.sizes)}-{resolution}"
            if size > args.encode_up_to and base.is_dir():
                replicate(base, folder, size)
            else:
                make_images(folder, size, args.image_side if resolution == args.resolutions[0] else resolution)
            row: dict = {"images": size, "resolution": resolution, "make_images_s": time.perf_counter() - began}
            first = prepare(folder, model, tagger, resolution)  # encodes; over copied caches: builds the index
            rerun = prepare(folder, model, tagger, resolution)
            row["prepare_first_s"], row["prepare_rerun_s"] = first["wall_s"], rerun["wall_s"]
            row["encoded"] = size <= args.encode_up_to or not base.is_dir()
            out = work / f"out-{key}"
            runs = {}
            for name, extra in (("disk first start", ["--cache_latents_to_disk"]), ("disk second start", ["--cache_latents_to_disk"]),
                                ("ram", ["--cache_latents"])):
                result = timed([sys.executable, *train_command(folder, model, out, resolution, *extra)], marker=FIRST_STEP)
                runs[name] = {"to_first_step_s": result["marker_s"], "wall_s": result["wall_s"],
                              "peak_rss_mb": max(p.get("Rss", 0) for p in result["peaks"].values()) / 1024}
            if args.two_processes:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *train_command(folder, model, out, resolution, "--cache_latents_to_disk")]
                result = timed(command, env={"ACCELERATE_USE_CPU": "true"}, marker=FIRST_STEP)
                workers = sorted((p for pid, p in result["peaks"].items() if p.get("Rss", 0) > 200 * 1024), key=lambda p: -p["Rss"])[:2]
                runs["2 processes"] = {"to_first_step_s": result["marker_s"], "wall_s": result["wall_s"],
                                       "rss_mb": [p["Rss"] / 1024 for p in workers], "pss_mb": [p["Pss"] / 1024 for p in workers]}
            row["runs"] = runs
            results["sizes"][key] = row
            print(json.dumps({key: row}, indent=1), flush=True)
            (work / "results.json").write_text(json.dumps(results, indent=1))
    report_start(results)
    return results


def report_start(results: dict) -> None:
    rows = list(results["sizes"].values())
    print("\n| images | res | prepare first | prepare rerun | first start | second start | peak RSS disk | peak RSS --cache_latents |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        runs = row["runs"]
        print(f"| {row['images']:,} | {row['resolution']} | {row['prepare_first_s']:.0f} s{'' if row.get('encoded', True) else ' (copied caches)'} | {row['prepare_rerun_s']:.1f} s | "
              f"{runs['disk first start']['to_first_step_s']:.1f} s | {runs['disk second start']['to_first_step_s']:.2f} s | "
              f"{runs['disk second start']['peak_rss_mb']:.0f} MB | {runs['ram']['peak_rss_mb']:.0f} MB |")
    base = [r for r in rows if r["images"] == min(x["images"] for x in rows) and r["resolution"] == rows[0]["resolution"]]
    if base:
        base = base[0]
        for row in rows:
            if row is base or row["resolution"] != base["resolution"]:
                continue
            extra = row["images"] - base["images"]
            second = row["runs"]["disk second start"]["to_first_step_s"] - base["runs"]["disk second start"]["to_first_step_s"]
            rss = row["runs"]["disk second start"]["peak_rss_mb"] - base["runs"]["disk second start"]["peak_rss_mb"]
            ram = row["runs"]["ram"]["peak_rss_mb"] - base["runs"]["ram"]["peak_rss_mb"]
            print(f"{row['images']:,} vs {base['images']:,} images: second start +{1000 * second / extra:.4f} ms per image, "
                  f"peak RSS +{1024 * rss / extra:.2f} KB per image with disk latents, +{1024 * ram / extra:.2f} KB with --cache_latents")
    for row in rows:
        two = row["runs"].get("2 processes")
        if two:
            print(f"{row['images']:,} images, 2 processes: RSS {', '.join(f'{v:.0f}' for v in two['rss_mb'])} MB, "
                  f"PSS {', '.join(f'{v:.0f}' for v in two['pss_mb'])} MB, first step after {two['to_first_step_s']:.1f} s")


DATA_CHILD = r'''
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
folder, model, resolution = sys.argv[2], sys.argv[3], int(sys.argv[4])
from library.data.dataset import collect_items, load_feature_table
from library.data.dataset_config import DatasetDefaults, config_from_train_data_dir
from library.data.index import DatasetIndex
from library.data.latents import valid_latent_caches, vae_id
from library.models.loading import load_sd_vae
identity = vae_id(load_sd_vae(model))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = [time.perf_counter()]
index = DatasetIndex()
items, _ = collect_items(config_from_train_data_dir(folder, DatasetDefaults(resolution=(resolution, resolution))), "x", index)
times.append(time.perf_counter())
table, _ = load_feature_table(items, index)
times.append(time.perf_counter())
valid = valid_latent_caches([item.latent_job() for item in items], identity, index)
times.append(time.perf_counter())
assert all(valid) and len(table) == len(items)
print("RESULT " + json.dumps({"items": len(items), "collect_s": times[1] - times[0], "features_s": times[2] - times[1],
                              "latents_s": times[3] - times[2], "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
'''


def bench_data(args) -> dict:
    """The data stage of a start alone (listing, buckets, captions, vectors, latent caches checked)
    over each finished folder with its index in place, in a fresh process: what a warm start costs
    per image, without the imports and model loading that dominate small runs."""
    work = Path(args.work_dir)
    model, _ = kit(work)
    results = {}
    for size in args.sizes:
        for resolution in args.resolutions:
            folder = work / f"data-{size}-{resolution}"
            result = subprocess.run([sys.executable, "-c", DATA_CHILD, str(REPO), str(folder), str(model), str(resolution)],
                                    capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            line = next((l for l in result.stdout.splitlines() if l.startswith("RESULT")), None)
            if line is None:
                raise RuntimeError(f"data stage over {folder} failed:\n{result.stderr[-2000:]}")
            results[f"{size}@{resolution}"] = row = json.loads(line[len("RESULT "):])
            total = row["collect_s"] + row["features_s"] + row["latents_s"]
            print(f"{size:,} images at {resolution}: collect {row['collect_s']:.2f} s, vectors {row['features_s']:.2f} s, "
                  f"latent caches {row['latents_s']:.2f} s; {1e6 * total / size:.1f} us per image; RSS +{row['rss_growth_mb']:.0f} MB", flush=True)
    (work / "data_stage.json").write_text(json.dumps(results, indent=1))
    return results


# -- saving -----------------------------------------------------------------------------------

SAVE_CHILD = r'''
import hashlib, io, sys, threading, time, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
variant, kind, dtype_name, model_dtype_name, out = sys.argv[2:7]
from tools.make_tiny_sd import build_pipeline
from library.models.checkpoints import checkpoint_state_dict, save_single_file, write_checkpoint_file
dtypes = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
dtype, model_dtype = dtypes[dtype_name], dtypes[model_dtype_name]
torch.set_default_dtype(model_dtype)  # built in the training dtype: SDXL in fp32 would take 14 GB first
pipe = build_pipeline(variant, 0)
torch.set_default_dtype(torch.float32)
for m in [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else []):
    m.to(model_dtype)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.005)
import gc; gc.collect()
before = rss()
threading.Thread(target=sample, daemon=True).start()
started = time.perf_counter()
if hasattr(pipe, "text_encoder_2"):
    from library.models.sdxl_checkpoint import save_sdxl_single_file, sdxl_checkpoint_state_dict
    if kind == "old":
        raise SystemExit("old: SD1/SD2 only")
    save_sdxl_single_file(out, pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, dtype, {"ss_x": "1"})
elif kind == "old":
    # the code before the streaming writer: cast copies, then the checkpoint serialised in memory to hash it
    from library.models.checkpoints import saveable
    from safetensors.torch import save as save_to_bytes, save_file
    tensors = saveable(checkpoint_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, "sd1"), dtype)
    data = io.BytesIO(save_to_bytes(tensors, {"ss_x": "1"}))
    n = int.from_bytes(data.read(8), "little"); data.seek(8 + n); hashlib.sha256(data.read()).hexdigest()
    data.seek(0x100000); hashlib.sha256(data.read(0x10000)).hexdigest()
    del data
    save_file(tensors, out, metadata={"ss_x": "1"})
else:
    save_single_file(out, pipe.unet, pipe.vae, pipe.text_encoder, "sd1", dtype, {"ss_x": "1"})
seconds = time.perf_counter() - started
stop.set(); time.sleep(0.02)
print(f"RESULT {before} {peak[0]} {seconds} {Path(out).stat().st_size}")
'''


def bench_save(args) -> dict:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind, suffix in (("safetensors", ".safetensors"), ("old", ".safetensors"), ("ckpt", ".ckpt")):
        if kind not in args.kinds:
            continue
        out = work / f"save-{args.variant}-{kind}{suffix}"
        result = subprocess.run([sys.executable, "-c", SAVE_CHILD, str(REPO), args.variant, kind, args.dtype, args.model_dtype, str(out)],
                                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        out.unlink(missing_ok=True)
        line = next((l for l in result.stdout.splitlines() if l.startswith("RESULT")), None)
        if line is None:
            results[kind] = {"error": (result.stderr or result.stdout)[-1500:], "returncode": result.returncode}
            print(kind, "failed:", results[kind]["error"][-500:], flush=True)
            continue
        before, peak, seconds, size = (float(v) for v in line.split()[1:])
        results[kind] = {"before_gb": before / 2**30, "peak_gb": peak / 2**30, "extra_gb": (peak - before) / 2**30,
                         "seconds": seconds, "file_gb": size / 2**30}
        print(kind, json.dumps(results[kind]), flush=True)
    print(f"\n| {args.variant}, model {args.model_dtype}, saved {args.dtype} | RSS before | peak | peak - before | file | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, r in results.items():
        if "error" not in r:
            print(f"| {kind} | {r['before_gb']:.2f} GB | {r['peak_gb']:.2f} GB | {r['extra_gb']:.2f} GB | {r['file_gb']:.2f} GB | {r['seconds']:.1f} |")
    (work / f"save-{args.variant}.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    start = sub.add_parser("start", help="data stage at scale: prepare, start time, memory")
    start.add_argument("--work_dir", default="/tmp/pfg_scale")
    start.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    start.add_argument("--resolutions", type=int, nargs="+", default=[32])
    start.add_argument("--image_side", type=int, default=32, help="image side at the first resolution")
    start.add_argument("--two_processes", action="store_true", help="also run torchrun with 2 CPU processes")
    start.add_argument("--encode_up_to", type=int, default=1000,
                       help="larger sizes copy the smallest size's images and caches instead of encoding them")
    data = sub.add_parser("data", help="the data stage of a warm start alone, over the folders `start` made")
    data.add_argument("--work_dir", default="/tmp/pfg_scale")
    data.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    data.add_argument("--resolutions", type=int, nargs="+", default=[32])
    save = sub.add_parser("save", help="single-file save peaks of a real-size model")
    save.add_argument("--work_dir", default="/tmp/pfg_scale")
    save.add_argument("--variant", default="sd15-size", choices=("sd15-size", "sdxl-size"))
    save.add_argument("--dtype", default="fp16", choices=("float", "fp16", "bf16"), help="--save_precision")
    save.add_argument("--model_dtype", default="float", choices=("float", "fp16", "bf16"), help="the weights' dtype in training")
    save.add_argument("--kinds", nargs="+", default=["safetensors", "old", "ckpt"])
    args = parser.parse_args(argv)
    {"start": bench_start, "data": bench_data, "save": bench_save}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
