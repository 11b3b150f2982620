"""Seconds per image of gen_pfg.py's sampler against the plain diffusers pipeline.

    python bench/bench_gen.py                                   # tiny offline SD1 model, CPU
    python bench/bench_gen.py --model SD_FOLDER --W 512 --H 512 --steps 20
    python bench/bench_gen.py --sd15 --device cuda --dtype fp16  # SD1.5-size UNet, random weights

Rows, all with the same UNet, VAE, text encoder, scheduler, steps, size and seed:
- `diffusers`: StableDiffusionPipeline called with the prompt text (the ceiling);
- `diffusers + N tokens`: the same pipeline fed a context N tokens longer, i.e. the attention
  cost PFG adds by design, with none of our code;
- `gen_pfg, PFG off`: PFGSampler.generate without guides (our prompt encoding, our pipeline use);
- `gen_pfg, PFG on`: PFGSampler.generate with a guide vector and an N-token PFG head.
Overhead is measured against `diffusers` (PFG off) and against `diffusers + N tokens` (PFG on).
Runs are interleaved (one of each per round) and the median is reported, so drift on a shared
machine hits every row alike. Model loading is not timed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def tiny_model():
    from library.models.loading import SDModel
    from tools.make_tiny_sd import build_pipeline

    pipe = build_pipeline("sd1", seed=0)
    return SDModel(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, dict(pipe.scheduler.config), "tiny-sd1", "sd1")


def sd15_model(device: str):
    """SD1.5's architecture from the bundled configs, random weights, built on `device`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from library.models.clip_vocab import write_clip_tokenizer_files
    from library.models.loading import SDModel

    configs = REPO / "library" / "models" / "configs" / "sd1"
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir))
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    with torch.device(device):  # initialise the 1B parameters where they will run
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    scheduler = dict(DDPMScheduler.load_config(configs / "scheduler"))
    return SDModel(tokenizer, text_encoder, unet, vae, scheduler, "sd15-random", "sd1")


def load_model(args):
    if args.sd15:
        return sd15_model(args.device)
    if args.model:
        from library.models.loading import load_sd_model

        return load_sd_model(args.model)
    return tiny_model()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="diffusers folder or checkpoint (default: the tiny model)")
    parser.add_argument("--sd15", action="store_true", help="SD1.5-size UNet/VAE/CLIP with random weights")
    parser.add_argument("--W", type=int, default=0, help="width (default: 512 with --sd15 or --model, else 128)")
    parser.add_argument("--H", type=int, default=0, help="height (default as --W)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="euler_a")
    parser.add_argument("--scale", type=float, default=7.0)
    parser.add_argument("--pfg_tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="", choices=("", "fp32", "fp16", "bf16"), help="default: fp16 on CUDA, fp32 on CPU")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from library.models.attention import set_attention_backend
    from library.models.loading import move
    from library.models.pfg import PFGAdapter, PFGShape
    from library.sample.sampler import Guide, PFGSampler, SampleRequest, make_scheduler

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    big = args.sd15 or bool(args.model)
    width = args.W or (512 if big else 128)
    height = args.H or width

    model = load_model(args)
    for module in (model.unet, model.vae, model.text_encoder):
        move(module, args.device, dtype).eval()
    set_attention_backend(model.unet, "sdpa")
    torch.manual_seed(1)
    adapter = PFGAdapter(PFGShape(args.pfg_tokens, 768, model.cross_attention_dim)).to(args.device, dtype).eval()

    work = Path(tempfile.mkdtemp(prefix="bench_gen_"))
    np.savez(work / "guide_pfg.npz", feature=np.random.default_rng(0).standard_normal(768).astype(np.float32))
    prompt = "illustration of *, 1girl, solo, long hair, smile, looking at viewer"
    request = SampleRequest(prompt=prompt, width=width, height=height, steps=args.steps, scale=args.scale,
                            seed=1, sampler=args.sampler)
    guided = replace(request, guides=(Guide(str(work / "guide_pfg.npz")),))

    plain = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=make_scheduler(args.sampler, model.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    plain.set_progress_bar_config(disable=True)
    off = PFGSampler(model, None, None, None, "zeros", args.device, dtype)
    on = PFGSampler(model, adapter, None, None, "zeros", args.device, dtype)

    def diffusers_text():
        plain.scheduler = make_scheduler(args.sampler, model.scheduler_config)
        plain(prompt, negative_prompt="", width=width, height=height, num_inference_steps=args.steps,
              guidance_scale=args.scale, generator=torch.Generator("cpu").manual_seed(1))

    def diffusers_longer():
        with torch.no_grad():
            cond, uncond = plain.encode_prompt(prompt, args.device, 1, True, "")
        pad = torch.zeros(1, args.pfg_tokens, cond.shape[-1], device=cond.device, dtype=cond.dtype)
        plain.scheduler = make_scheduler(args.sampler, model.scheduler_config)
        plain(prompt_embeds=torch.cat([cond, pad + 0.1], 1), negative_prompt_embeds=torch.cat([uncond, pad], 1),
              width=width, height=height, num_inference_steps=args.steps, guidance_scale=args.scale,
              generator=torch.Generator("cpu").manual_seed(1))

    rows = {
        "diffusers": diffusers_text,
        f"diffusers + {args.pfg_tokens} tokens": diffusers_longer,
        "gen_pfg, PFG off": lambda: off.generate(request, 1),
        "gen_pfg, PFG on": lambda: on.generate(guided, 1),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name, fn in rows.items():  # warm-up: kernels, allocator, caches
        timed(fn)
    for _ in range(args.repeats):
        for name, fn in rows.items():
            times[name].append(timed(fn))

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    which = "SD1.5-size, random weights" if args.sd15 else (args.model or "tiny SD1 (tools/make_tiny_sd.py)")
    print(f"model: {which}; {width}x{height}, {args.steps} steps, {args.sampler}, CFG {args.scale:g}, {args.dtype}, {device_name}")
    print(f"median of {args.repeats} interleaved rounds; overhead vs the diffusers row of equal context length")
    print()
    print("| run | s/image | it/s | overhead |")
    print("| --- | ---: | ---: | ---: |")
    median = {name: statistics.median(values) for name, values in times.items()}
    baseline = {"gen_pfg, PFG off": "diffusers", "gen_pfg, PFG on": f"diffusers + {args.pfg_tokens} tokens"}
    for name, seconds in median.items():
        overhead = f"{(seconds / median[baseline[name]] - 1) * 100:+.1f}%" if name in baseline else ""
        if name == f"diffusers + {args.pfg_tokens} tokens":
            overhead = f"({(seconds / median['diffusers'] - 1) * 100:+.1f}% vs diffusers)"
        print(f"| {name} | {seconds:.4f} | {args.steps / seconds:.2f} | {overhead} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
