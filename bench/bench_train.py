"""Training speed of train_pfg.py against a bare hand-written diffusers loop (the ceiling).

    python bench/bench_train.py [--steps 40] [--modes none full lora] [--model SD_FOLDER --resolution 512 --batch 4]
        [--precision bf16 --full_bf16 --gradient_checkpointing --optimizer Adafactor]

Both sides train the same UNet on the same cached latents with the same optimizer (AdamW8bit
unless --optimizer names another train_pfg.py --optimizer_type), batch size and memory settings:
--full_bf16 keeps the trained weights in bf16 and --gradient_checkpointing recomputes UNet
activations, on both sides (SDXL's 24 GB full fine-tune: --full_bf16 --gradient_checkpointing
with AdamW8bit or Adafactor). Both time the steady state: the same steps after 3 warm-up steps,
excluding model loading and saving. Each measurement runs in its own process, whose peak RSS
(or peak CUDA memory) is reported.
Without --model, the tiny offline SD1 model (or --tiny sdxl, or real sizes with random weights:
SD 1.5's with --tiny sd15-size --resolution 512, SDXL base's with --tiny sdxl-size --resolution 1024) and the demo dataset are
built under bench/work/. An SDXL --model (a folder with text_encoder_2) is benchmarked with its
pooled text embedding and size/crop time ids on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORK = REPO / "bench" / "work"


def prepare(args) -> tuple[Path, Path]:
    """Model folder and a dataset TOML whose images have feature caches."""
    import prepare_features
    from tools.make_demo_dataset import build_demo_dataset
    from tools.make_tiny_sd import build_tiny_sd
    from tools.make_tiny_tagger import build_tiny_tagger

    model = Path(args.model) if args.model else build_tiny_sd(WORK / f"tiny-{args.tiny}", args.tiny)
    data = build_demo_dataset(WORK / "data")
    tagger = build_tiny_tagger(WORK / "tagger")
    toml = WORK / f"dataset-{args.resolution}.toml"
    toml.write_text(
        f"[general]\nresolution = {args.resolution}\nbatch_size = {args.batch}\nenable_bucket = false\n"
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{(data / "images").as_posix()}"\nnum_repeats = 20\n'
    )
    prepare_features.main(["--dataset_config", str(toml), "--tagger_model", str(tagger)])
    return model, toml


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(model: Path, toml: Path, args) -> dict:
    """train_pfg.py's own main(); the steady-state loop time is read from the moments its
    training step starts (one per optimizer step), after the same 3 warm-up steps."""
    import train_pfg
    from library.train.trainer import PFGTrainer

    starts: list[float] = []
    original = PFGTrainer.loss

    def timed_loss(self, *a, **kw):
        starts.append(time.perf_counter())
        return original(self, *a, **kw)

    PFGTrainer.loss = timed_loss
    out = WORK / f"out-{args.mode}"
    train_pfg.main([
        "--pretrained_model_name_or_path", str(model), "--dataset_config", str(toml), "--output_dir", str(out),
        "--train_unet", args.mode, "--max_train_steps", str(args.steps + 4), "--cache_latents", "--mixed_precision", args.precision,
        "--learning_rate", "1e-5", "--save_model_as", "diffusers", "--optimizer_type", args.optimizer, *memory_flags(args),
    ])
    return {"seconds": starts[3 + args.steps] - starts[3], "peak_mb": peak_memory_mb()}


def memory_flags(args) -> list[str]:
    """The train_pfg.py flags for the memory settings, which the bare loop mirrors."""
    return [flag for flag, on in (("--full_bf16", args.full_bf16), ("--gradient_checkpointing", args.gradient_checkpointing)) if on]


def run_bare(model: Path, toml: Path, args) -> dict:
    """The ceiling: diffusers' own pieces in a plain loop, no dataset machinery, no accelerate.
    The optimizer is the same class train_pfg.py builds for `--optimizer` (with its defaults)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from library.data.dataset import collect_items, load_features
    from library.data.dataset_config import load_dataset_config
    from library.data.latents import bucket_pixels
    from library.train.optim import build_optimizer

    mode, steps, precision = args.mode, args.steps, args.precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    config = load_dataset_config(toml)
    items, _ = collect_items(config, "illustration of *")
    features, _ = load_features(items)
    batch = config.datasets[0].batch_size
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder").to(device).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model / "vae").to(device).requires_grad_(False)
    weight_dtype = torch.bfloat16 if args.full_bf16 else torch.float32  # the trained weights' dtype
    unet = UNet2DConditionModel.from_pretrained(model / "unet").to(device, dtype=weight_dtype)
    scheduler = DDPMScheduler.from_pretrained(model / "scheduler")
    width = unet.config.cross_attention_dim
    head = torch.nn.Linear(features.shape[1], 10 * width).to(device, dtype=weight_dtype)
    unet.requires_grad_(mode == "full")
    if mode == "lora":
        unet.add_adapter(LoraConfig(r=16, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = list(head.parameters()) + [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optimizer, [{"params": params, "lr": 1e-5}])
    with torch.no_grad():  # cached latents and text states, as train_pfg.py --cache_latents has them
        pixels = torch.stack([bucket_pixels(item.image_path, item.assignment) for item in items[: 4 * batch]]).to(device)
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(["illustration of *"] * batch, padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
        text = text_encoder(ids).last_hidden_state
        added = None
        if (model / "text_encoder_2").is_dir():  # SDXL: penultimate states of both encoders, pooled bigG, time ids
            from transformers import CLIPTextModelWithProjection

            tokenizer_2 = CLIPTokenizer.from_pretrained(model / "tokenizer_2")
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(model / "text_encoder_2").to(device)
            ids_2 = tokenizer_2(["illustration of *"] * batch, padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
            second = text_encoder_2(ids_2, output_hidden_states=True)
            text = torch.cat([text_encoder(ids, output_hidden_states=True).hidden_states[-2], second.hidden_states[-2]], dim=-1)
            size = latents.shape[-1] * 8
            added = {"text_embeds": second.text_embeds, "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device)}
    unet.train()

    def step(k: int) -> None:
        x0 = latents[(k % 4) * batch : (k % 4 + 1) * batch]
        f = features[(k % 4) * batch : (k % 4 + 1) * batch].to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=precision != "no"):
            context = torch.cat([text, head(f).reshape(batch, 10, width)], dim=1)
            pred = unet(scheduler.add_noise(x0, noise, t), t, context, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for k in range(3):  # warm-up
        step(k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for k in range(steps):
        step(k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - started, "peak_mb": peak_memory_mb()}


def measure(kind: str, mode: str, steps: int, args) -> dict:
    """One measurement in a fresh process (clean peak memory, no shared caches)."""
    command = [sys.executable, __file__, "--worker", kind, "--mode", mode, "--steps", str(steps),
               "--resolution", str(args.resolution), "--batch", str(args.batch), "--precision", args.precision,
               "--optimizer", args.optimizer, *memory_flags(args)]
    if args.model:
        command += ["--model", args.model]
    command += ["--tiny", args.tiny]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{kind}/{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--modes", nargs="+", default=["none", "full", "lora"])
    parser.add_argument("--model", default="")
    parser.add_argument("--tiny", default="sd1", choices=["sd1", "sd15-size", "sdxl", "sdxl-size"],
                        help="the random-weight model built when --model is not given (sd15-size / sdxl-size: SD 1.5 / SDXL base sizes, 2 / 7 GB)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--optimizer", default="AdamW8bit", help="both sides' optimizer, a train_pfg.py --optimizer_type name (AdamW8bit, AdamW, Adafactor, ...)")
    parser.add_argument("--full_bf16", action="store_true", help="trained weights in bf16 on both sides (needs --precision bf16)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute UNet activations in the backward pass, both sides")
    parser.add_argument("--worker", default="")
    parser.add_argument("--mode", default="full")
    args = parser.parse_args()
    if args.full_bf16 and args.precision != "bf16":
        parser.error("--full_bf16 needs --precision bf16 (as train_pfg.py's --full_bf16 needs --mixed_precision bf16)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        model, toml = prepare(args)
        runner = run_ours if args.worker == "ours" else run_bare
        print(json.dumps(runner(model, toml, args)))
        return
    prepare(args)  # build once, outside the timed processes
    settings = ", ".join([f"precision {args.precision}", f"optimizer {args.optimizer}", *(f[2:] for f in memory_flags(args)),
                          f"batch {args.batch}", f"{args.resolution}px"])
    print(f"settings: {settings}")
    print("| mode | train_pfg.py steps/s | bare loop steps/s | ratio | train_pfg peak MB | bare peak MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in args.modes:
        ours = measure("ours", mode, args.steps, args)
        bare = measure("bare", mode, args.steps, args)
        ours_rate, bare_rate = args.steps / ours["seconds"], args.steps / bare["seconds"]
        print(f"| {mode} | {ours_rate:.2f} | {bare_rate:.2f} | {ours_rate / bare_rate:.2f} | {ours['peak_mb']:.0f} | {bare['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
