"""Build a tiny Stable Diffusion folder with random weights, offline and deterministically.

The layout is the real one (diffusers StableDiffusionPipeline: UNet with 3 cross-attention
down/up blocks and 2 layers per block, a 4-block VAE, CLIPTextModel + CLIPTokenizer, a DDPM-family
scheduler), only with narrow channels, so every code path that touches real SD1.x/SD2.x models
(key names, LDM conversion, clip skip, v-prediction, padding) runs on CPU in milliseconds.

    python -m tools.make_tiny_sd --out tiny-sd1 --variant sd1 --seed 0

`--variant sdxl` builds a StableDiffusionXLPipeline folder instead: the SDXL block layout
(a plain first level, transformer depth growing with depth), "text_time" added conditioning,
CLIP-L + bigG-style text encoders (the second with a projection, padding with "!") whose
widths add up to the UNet's cross-attention width, and SDXL's Euler scheduler and VAE scale.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from library.clip_vocab import write_clip_tokenizer_files
from library.errors import UserError, run_cli
from library.fileio import atomic_dir

MARKER = "tiny_kit.json"
KIT_VERSION = 1  # bump when the architecture changes, so stale folders are rebuilt
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class Variant:
    """What differs between the SD1.x-like and SD2.x-like tiny models (mirrors the real ones)."""

    text_hidden: int  # CLIP hidden size == UNet cross_attention_dim, as in real SD
    attention_head_dim: int | tuple[int, ...]  # diffusers' legacy meaning: number of heads
    use_linear_projection: bool
    hidden_act: str
    pad_token: str
    prediction_type: str
    scheduler: str  # the scheduler class the real model ships with


VARIANTS: dict[str, Variant] = {
    # SD1.x (real: 768 wide, 8 heads everywhere): a fixed head count, conv projections in the
    # transformers, quick_gelu CLIP, epsilon prediction, PNDM scheduler, pads with <|endoftext|>.
    "sd1": Variant(32, 4, False, "quick_gelu", "<|endoftext|>", "epsilon", "PNDMScheduler"),
    # SD2.x (real: 1024 wide, 64-channel heads): a different width, heads growing with the block
    # width (fixed head size 16 here), linear projections, gelu, v-prediction, DDIM, pads with "!".
    "sd2": Variant(64, (2, 2, 4, 4), True, "gelu", "!", "v_prediction", "DDIMScheduler"),
}

UNET_CHANNELS = (32, 32, 64, 64)
VAE_CHANNELS = (16, 32, 64, 64)
TEXT_LAYERS = 4  # enough that clip skip 2 picks a different layer than the last
SAMPLE_SIZE = 16  # latent size; the pipeline's default image is 8x this = 128 px


def build_unet(v: Variant, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=v.text_hidden,
        attention_head_dim=v.attention_head_dim,
        use_linear_projection=v.use_linear_projection,
    )


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples: latents are 1/8 of the image
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_CHANNELS,
        layers_per_block=2,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=SAMPLE_SIZE * 8,
        scaling_factor=0.18215,
    )


def build_text_encoder(v: Variant, seed: int, pad_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=v.text_hidden,
        intermediate_size=v.text_hidden * 4,
        projection_dim=v.text_hidden,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=v.hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,  # not 2: pooling then looks for the real EOS id, as current SD configs do
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def build_scheduler(v: Variant):
    import diffusers

    # The betas and flags real SD ships; any DDPM-family class reads this config.
    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=v.prediction_type,
    )
    if v.scheduler == "PNDMScheduler":
        return diffusers.PNDMScheduler(skip_prk_steps=True, **common)
    return diffusers.DDIMScheduler(clip_sample=False, **common)


# SDXL (real: CLIP-L 768 + bigG 1280 = 2048, levels 320/640/1280 with 0/2/10 transformer layers,
# 64-wide heads, 256-wide size/crop embeddings): the same shape rules at toy widths.
SDXL_TEXT_HIDDEN = (32, 64)  # CLIP-L-like, bigG-like
SDXL_UNET_CHANNELS = (32, 64, 64)
SDXL_TRANSFORMER_LAYERS = (1, 1, 2)  # level 0 has none (DownBlock2D); more layers deeper down
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim: each of the 6 size/crop numbers gets this width


def build_sdxl_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=SDXL_UNET_CHANNELS,
        layers_per_block=2,
        norm_num_groups=8,
        transformer_layers_per_block=SDXL_TRANSFORMER_LAYERS,
        cross_attention_dim=sum(SDXL_TEXT_HIDDEN),
        attention_head_dim=tuple(c // 16 for c in SDXL_UNET_CHANNELS),  # 16-wide heads
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        # pooled bigG embedding + 6 time ids, each embedded to SDXL_TIME_EMBED_DIM
        projection_class_embeddings_input_dim=SDXL_TEXT_HIDDEN[1] + 6 * SDXL_TIME_EMBED_DIM,
    )


def build_sdxl_text_encoders(seed: int, pad_token_id_2: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(hidden: int, act: str, pad: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4, projection_dim=hidden,
            num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=pad,
        )

    torch.manual_seed(seed)
    first = CLIPTextModel(config(SDXL_TEXT_HIDDEN[0], "quick_gelu", 49407))
    torch.manual_seed(seed + 1)
    second = CLIPTextModelWithProjection(config(SDXL_TEXT_HIDDEN[1], "gelu", pad_token_id_2))
    return first, second


def build_sdxl_scheduler():
    import diffusers

    # SDXL base's scheduler_config.json
    return diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        interpolation_type="linear", prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
        use_karras_sigmas=False,
    )


def build_sdxl_pipeline(seed: int = 0):
    """The tiny StableDiffusionXLPipeline in memory."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir, tempfile.TemporaryDirectory() as tok_dir_2:
        write_clip_tokenizer_files(Path(tok_dir), pad_token="<|endoftext|>")
        write_clip_tokenizer_files(Path(tok_dir_2), pad_token="!")
        tokenizer, tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir), CLIPTokenizer.from_pretrained(tok_dir_2)
    text_encoder, text_encoder_2 = build_sdxl_text_encoders(seed, tokenizer_2.pad_token_id)
    vae = build_vae(seed)
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE scale; fp16-unsafe
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=build_sdxl_unet(seed), scheduler=build_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def build_pipeline(variant: str = "sd1", seed: int = 0):
    """The tiny StableDiffusionPipeline (or XL pipeline) in memory (each model seeded on its own)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    if variant == "sdxl":
        return build_sdxl_pipeline(seed)
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose one of {', '.join([*VARIANTS, 'sdxl'])}")
    v = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir), pad_token=v.pad_token)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    return StableDiffusionPipeline(
        vae=build_vae(seed),
        text_encoder=build_text_encoder(v, seed, tokenizer.pad_token_id),
        tokenizer=tokenizer,
        unet=build_unet(v, seed),
        scheduler=build_scheduler(v),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _settings(variant: str, seed: int) -> dict:
    return {"kind": "tiny_sd", "version": KIT_VERSION, "variant": variant, "seed": seed}


def _is_complete(out_dir: Path, settings: dict) -> bool:
    marker = out_dir / MARKER
    if not marker.is_file() or json.loads(marker.read_text()) != settings:
        return False
    components = COMPONENTS + (("text_encoder_2", "tokenizer_2") if settings["variant"] == "sdxl" else ())
    return (out_dir / "model_index.json").is_file() and all((out_dir / c).is_dir() for c in components)


def build_tiny_sd(out_dir: Path, variant: str = "sd1", seed: int = 0) -> Path:
    """Write the tiny SD folder to `out_dir` (reused when already built with the same settings)."""
    out_dir = Path(out_dir)
    settings = _settings(variant, seed)
    if _is_complete(out_dir, settings):
        return out_dir
    # Replace only what we built ourselves; never delete a user's unrelated folder.
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise UserError(f"{out_dir} exists and is not a tiny model kit folder; choose another --out")
    pipe = build_pipeline(variant, seed)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # Real SD folders ship vocab.json + merges.txt (no tokenizer.json); keep that layout so
        # the loading path users hit is the one the tests exercise.
        shutil.rmtree(tmp / "tokenizer")
        if variant == "sdxl":
            write_clip_tokenizer_files(tmp / "tokenizer", pad_token="<|endoftext|>")
            shutil.rmtree(tmp / "tokenizer_2")
            write_clip_tokenizer_files(tmp / "tokenizer_2", pad_token="!")
        else:
            write_clip_tokenizer_files(tmp / "tokenizer", pad_token=VARIANTS[variant].pad_token)
        (tmp / MARKER).write_text(json.dumps(settings, indent=2) + "\n")  # last: marks it complete
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (diffusers layout)")
    parser.add_argument("--variant", choices=sorted([*VARIANTS, "sdxl"]), default="sd1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = build_tiny_sd(args.out, args.variant, args.seed)
    print(f"tiny {args.variant} model: {path}")


if __name__ == "__main__":
    run_cli(main)
