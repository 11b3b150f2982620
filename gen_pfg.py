"""Generate images guided by images: Stable Diffusion (SD1.x, SD2.x or SDXL, the same commands)
+ a trained PFG head + the image encoder.

    python gen_pfg.py --pretrained_model_name_or_path SD --pfg_weights NAME-pfg.safetensors \
        --tagger_model TAGGER --image guide.png --prompt "illustration of *" --outdir out/

Outputs: OUTDIR/NNNNN-SEED.png, one per image, with the A1111 `parameters` that reproduce it;
NNNNN counts every image of the folder (continuing after the highest number there), SEED is the
image's seed (image k of a prompt: its seed + k), so a seed repeats across prompts, never a name.
--grid adds OUTDIR/grid-NNNNN.png (NNNNN of the run's last image): a row per prompt.

The recipe: settings -> model (+LoRA, +VAE) -> PFG head and encoder -> requests -> images.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

from library.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    from library.cli_config import parse_settings
    from library.sample.settings import GenSettings

    settings, _ = parse_settings(GenSettings, argv, __doc__)
    settings.validate()
    requests = build_requests(settings)  # prompt-file mistakes surface before models load

    import torch

    from library.sample.image_outputs import grid_row, next_index, save_grid, save_png
    from library.models.loading import load_for_inference
    from library.models.pfg import check_compatible, load_pfg
    from library.sample.sampler import PFGSampler, a1111_parameters

    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[settings.dtype]

    # 1. The model, with its LoRA files and VAE override.
    model = load_for_inference(
        settings.pretrained_model_name_or_path, v_prediction=settings.v_parameterization, vae=settings.vae,
        lora_files=settings.network_weights, lora_multipliers=settings.network_mul, device=device, dtype=dtype,
        attention="xformers" if settings.xformers else "sdpa",
    )
    if settings.vae_slicing:
        model.vae.enable_slicing()
    if settings.vae_tiling:
        model.vae.enable_tiling()

    # 2. The PFG head and the image encoder, checked against each other and the UNet.
    adapter, encoder = None, None
    if settings.pfg_weights:
        adapter, pfg_info = load_pfg(settings.pfg_weights, model.cross_attention_dim)
        adapter.to(device, dtype=dtype).eval()
        if settings.tagger_model:
            from library.models.image_encoders import load_encoder

            encoder = load_encoder(settings.tagger_model, device=device.type, feature_tensor=settings.feature_tensor or None)
        check_compatible(adapter, settings.pfg_weights, encoder.dim if encoder else None, model.cross_attention_dim)
        trained_with = pfg_info.get("pfg.encoder", "")
        if encoder is not None and trained_with and trained_with != encoder.encoder_id:
            print(f"warning: {settings.pfg_weights} was trained with encoder {trained_with}, guide images use {encoder.encoder_id}")
    prompt_encoder = model.prompt_encoder(clip_skip=settings.clip_skip)
    sampler = PFGSampler(model, adapter, encoder, prompt_encoder, settings.uncond, device, dtype)

    # 3. Generate and save, each PNG with the parameters that reproduce it.
    outdir = Path(settings.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    index = next_index(outdir)
    model_name = Path(settings.pretrained_model_name_or_path).name
    pfg_name = Path(settings.pfg_weights).name if settings.pfg_weights else ""
    grid_rows = []
    for request in requests:
        if not (request.width and request.height):
            request = sampler.sized(request)
            print(f"size {request.width}x{request.height} (chosen from the model; --W/--H set it)")
        results, seeds = [], []
        for start in range(0, settings.images_per_prompt, settings.batch_size):
            count = min(settings.batch_size, settings.images_per_prompt - start)
            batch_request = request if start == 0 else _shift_seed(request, start)
            for image, seed in sampler.generate(batch_request, count):
                path = outdir / f"{index:05d}-{seed}.png"
                parameters = a1111_parameters(request, seed, model_name, pfg_name, settings.clip_skip, settings.uncond)
                save_png(image, path, parameters)
                print(f"wrote {path}")
                results.append(image)
                seeds.append(seed)
                index += 1
        if settings.grid:
            grid_rows.append(grid_row(request, results, seeds))
    if settings.grid:
        print(f"wrote {save_grid(grid_rows, outdir / f'grid-{index - 1:05d}.png')}")
    return 0


def build_requests(settings) -> list:
    """The command-line request, or one per prompt-file line; every file they name is checked
    here, so a typo on line 30 fails before the first image, not after the 29th."""
    from library.sample.prompt_file import read_prompt_file
    from library.sample.sampler import Guide, SampleRequest, canonical_sampler, make_scheduler

    seed = settings.seed if settings.seed >= 0 else random.randint(0, 2**31 - 1)
    defaults = SampleRequest(
        prompt=settings.prompt, negative_prompt=settings.negative_prompt, width=settings.W, height=settings.H,
        steps=settings.steps, scale=settings.scale, seed=seed, sampler=canonical_sampler(settings.sampler),
        pfg_scale=settings.pfg_scale, guides=tuple(Guide.parse(p) for p in [*settings.image, *settings.features]),
        negative_guides=tuple(Guide.parse(p) for p in settings.negative_image),
        init_image=settings.init_image, strength=settings.strength,
    )
    defaults.validate("gen_pfg.py")
    requests = read_prompt_file(settings.from_file, defaults) if settings.from_file else [defaults]
    source = settings.from_file or "command line"
    for number, request in enumerate(requests, start=1):
        where = f"{source}, prompt {number}" if settings.from_file else source
        guides = [*request.guides, *request.negative_guides]
        for guide in guides:
            if not Path(guide.path).is_file():
                raise UserError(f"{where}: {_missing_guide(guide.path)}")
            if not guide.path.endswith(".npz") and not settings.tagger_model:
                raise UserError(f"{where}: guide image {guide.path} needs --tagger_model to become a vector")
        if guides and not settings.pfg_weights:
            raise UserError(f"{where}: guide images ({guides[0].path}) need --pfg_weights")
        if settings.pfg_weights and not guides and request.pfg_scale != 0:
            # The PFG head would be loaded and never used: an unguided image, without a word.
            raise UserError(
                f"{where}: --pfg_weights is given but no guide: pass --image GUIDE.png or --features X_pfg.npz"
                + (" (or --i GUIDE.png on the prompt line)" if settings.from_file else "")
                + "; for an unguided image on purpose, leave out --pfg_weights or set --pfg_scale 0"
            )
        if request.init_image and not Path(request.init_image).is_file():
            raise UserError(f"{where}: init image not found: {request.init_image}")
    # A line without its own --i inherits the command line's guides: unused only when no line does.
    if settings.from_file and defaults.guides and all(r.guides != defaults.guides for r in requests):
        print(f"note: every line of {settings.from_file} has its own --i, so --image/--features are not used")
    for sampler in {r.sampler for r in requests}:
        make_scheduler(sampler, {})  # a sampler with a missing optional package fails here, not mid-run
    return requests


def _missing_guide(text: str) -> str:
    """Why a guide path is not a file: `guide.png:abc` names an existing file with a bad weight."""
    head, sep, weight = text.rpartition(":")
    if sep and Path(head).is_file():
        return f"{text}: the weight {weight!r} is not a number (PATH:WEIGHT, e.g. {head}:0.5)"
    return f"guide not found: {text}"


def _shift_seed(request, offset: int):
    from dataclasses import replace

    return replace(request, seed=request.seed + offset)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
