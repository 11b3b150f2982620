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

from library.models.clip_vocab import write_clip_tokenizer_files
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
    # Widths: the test kit's by default; "sd15-size" has SD 1.5's real ones.
    unet_channels: tuple[int, ...] = (32, 32, 64, 64)
    text_layers: int = 4  # enough that clip skip 2 picks a different layer than the last
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    norm_groups: int = 8
    sample_size: int = 16  # latent size; the pipeline's default image is 8x this = 128 px


VARIANTS: dict[str, Variant] = {
    # SD1.x (real: 768 wide, 8 heads everywhere): a fixed head count, conv projections in the
    # transformers, quick_gelu CLIP, epsilon prediction, PNDM scheduler, pads with <|endoftext|>.
    "sd1": Variant(32, 4, False, "quick_gelu", "<|endoftext|>", "epsilon", "PNDMScheduler"),
    # SD2.x (real: 1024 wide, 64-channel heads): a different width, heads growing with the block
    # width (fixed head size 16 here), linear projections, gelu, v-prediction, DDIM, pads with "!".
    "sd2": Variant(64, (2, 2, 4, 4), True, "gelu", "!", "v_prediction", "DDIMScheduler"),
    # SD 1.5's real sizes (860M-parameter UNet, CLIP ViT-L/14 text encoder), random weights: for
    # benchmarks and memory measurements (2 GB in fp16).
    "sd15-size": Variant(768, 8, False, "quick_gelu", "<|endoftext|>", "epsilon", "PNDMScheduler",
                         unet_channels=(320, 640, 1280, 1280), text_layers=12, text_heads=12,
                         vae_channels=(128, 256, 512, 512), norm_groups=32, sample_size=64),
}

VAE_CHANNELS = VARIANTS["sd1"].vae_channels
TEXT_LAYERS = VARIANTS["sd1"].text_layers
SAMPLE_SIZE = VARIANTS["sd1"].sample_size
FP16_SAVED = ("sdxl-size", "sd15-size")  # benchmark sizes: saved in half precision (loaded in fp32 anyway)


def build_unet(v: Variant, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=v.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=v.unet_channels,
        layers_per_block=2,
        norm_num_groups=v.norm_groups,
        cross_attention_dim=v.text_hidden,
        attention_head_dim=v.attention_head_dim,
        use_linear_projection=v.use_linear_projection,
    )


def build_vae(seed: int, channels: tuple[int, ...] = VAE_CHANNELS, norm_groups: int = 8, sample_size: int = SAMPLE_SIZE * 8):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples: latents are 1/8 of the image
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=2,
        norm_num_groups=norm_groups,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


def build_text_encoder(v: Variant, seed: int, pad_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=v.text_hidden,
        intermediate_size=v.text_hidden * 4,
        projection_dim=v.text_hidden,
        num_hidden_layers=v.text_layers,
        num_attention_heads=v.text_heads,
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


@dataclass(frozen=True)
class XLSize:
    """The widths of an SDXL-layout model; the shape rules (block layout, conditioning) are fixed."""

    text_hidden: tuple[int, int]  # CLIP-L, bigG; their sum is the UNet's cross-attention width
    text_layers: tuple[int, int]
    text_heads: tuple[int, int]
    unet_channels: tuple[int, int, int]
    transformer_layers: tuple[int, int, int]  # level 0 has none in use (DownBlock2D)
    head_width: int
    time_embed_dim: int  # addition_time_embed_dim: each of the 6 size/crop numbers gets this width
    norm_groups: int
    vae_channels: tuple[int, ...]
    sample_size: int  # latent size


XL_SIZES: dict[str, XLSize] = {
    # The test kit: real SDXL's rules at toy widths.
    "sdxl": XLSize((32, 64), (TEXT_LAYERS, TEXT_LAYERS), (4, 4), (32, 64, 64), (1, 1, 2), 16, 8, 8, VAE_CHANNELS, SAMPLE_SIZE),
    # SDXL base 1.0's sizes (2.57B-parameter UNet, CLIP-L + bigG), random weights: for benchmarks.
    "sdxl-size": XLSize((768, 1280), (12, 32), (12, 20), (320, 640, 1280), (1, 2, 10), 64, 256, 32, (128, 256, 512, 512), 128),
}


def build_sdxl_unet(seed: int, size: XLSize = XL_SIZES["sdxl"]):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=size.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=size.unet_channels,
        layers_per_block=2,
        norm_num_groups=size.norm_groups,
        transformer_layers_per_block=size.transformer_layers,
        cross_attention_dim=sum(size.text_hidden),
        attention_head_dim=tuple(c // size.head_width for c in size.unet_channels),  # heads per level
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=size.time_embed_dim,
        # pooled bigG embedding + 6 time ids, each embedded to time_embed_dim
        projection_class_embeddings_input_dim=size.text_hidden[1] + 6 * size.time_embed_dim,
    )


def build_sdxl_text_encoders(seed: int, pad_token_id_2: int, size: XLSize = XL_SIZES["sdxl"]):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(i: int, act: str, pad: int) -> CLIPTextConfig:
        hidden = size.text_hidden[i]
        return CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4, projection_dim=hidden,
            num_hidden_layers=size.text_layers[i], num_attention_heads=size.text_heads[i], max_position_embeddings=77,
            hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=pad,
        )

    torch.manual_seed(seed)
    first = CLIPTextModel(config(0, "quick_gelu", 49407))
    torch.manual_seed(seed + 1)
    second = CLIPTextModelWithProjection(config(1, "gelu", pad_token_id_2))
    return first, second


def build_sdxl_scheduler():
    import diffusers

    # SDXL base's scheduler_config.json
    return diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        interpolation_type="linear", prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
        use_karras_sigmas=False,
    )


def build_sdxl_pipeline(seed: int = 0, size: XLSize = XL_SIZES["sdxl"]):
    """An SDXL-layout StableDiffusionXLPipeline in memory (the tiny one by default)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir, tempfile.TemporaryDirectory() as tok_dir_2:
        write_clip_tokenizer_files(Path(tok_dir), pad_token="<|endoftext|>")
        write_clip_tokenizer_files(Path(tok_dir_2), pad_token="!")
        tokenizer, tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir), CLIPTokenizer.from_pretrained(tok_dir_2)
    text_encoder, text_encoder_2 = build_sdxl_text_encoders(seed, tokenizer_2.pad_token_id, size)
    vae = build_vae(seed, size.vae_channels, size.norm_groups, size.sample_size * 8)
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE scale; fp16-unsafe
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=build_sdxl_unet(seed, size), scheduler=build_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def build_pipeline(variant: str = "sd1", seed: int = 0):
    """The tiny StableDiffusionPipeline (or XL pipeline) in memory (each model seeded on its own)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    if variant in XL_SIZES:
        return build_sdxl_pipeline(seed, XL_SIZES[variant])
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose one of {', '.join([*VARIANTS, *XL_SIZES])}")
    v = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir), pad_token=v.pad_token)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    return StableDiffusionPipeline(
        vae=build_vae(seed, v.vae_channels, v.norm_groups, v.sample_size * 8),
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
    components = COMPONENTS + (("text_encoder_2", "tokenizer_2") if settings["variant"] in XL_SIZES else ())
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
    if variant in FP16_SAVED:
        pipe.to(torch.float16)  # SDXL: 7 GB instead of 14; training loads the weights in its own precision
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # Real SD folders ship vocab.json + merges.txt (no tokenizer.json); keep that layout so
        # the loading path users hit is the one the tests exercise.
        shutil.rmtree(tmp / "tokenizer")
        if variant in XL_SIZES:
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
    parser.add_argument("--variant", choices=sorted([*VARIANTS, *XL_SIZES]), default="sd1",
                        help="sd15-size / sdxl-size: SD 1.5's / SDXL base's real sizes with random weights (2 / 7 GB), for benchmarks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = build_tiny_sd(args.out, args.variant, args.seed)
    print(f"tiny {args.variant} model: {path}")


if __name__ == "__main__":
    run_cli(main)
