"""Loading Stable Diffusion components from what users have: a diffusers folder, a single-file
checkpoint (original LDM layout) or a hub id.

Local paths never touch the network. Single files are handled by `library.models.checkpoints`
(SDXL: `library.models.sdxl_checkpoint`); a hub id goes through `library.models.hub`, which
downloads only what the loader reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclass
class SDModel:
    """The pieces of an SD1.x/SD2.x/SDXL model the trainer and the sampler need."""

    tokenizer: object  # transformers CLIPTokenizer
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict  # the training noise schedule (betas, prediction type)
    source: str  # what the user passed, for metadata
    variant: str  # "sd1" | "sd2" | "sdxl"
    text_encoder_2: torch.nn.Module | None = None  # SDXL: OpenCLIP bigG (CLIPTextModelWithProjection)
    tokenizer_2: object = None  # SDXL: bigG's tokenizer (pads with "!")

    @property
    def family(self):
        """The ModelFamily strategy (library/models/families): what differs between SD1/SD2/SDXL."""
        from library.models.families import family_named

        return family_named(self.variant)

    @property
    def is_sdxl(self) -> bool:
        return self.variant == "sdxl"

    def prompt_encoder(self, max_token_length: int = 75, clip_skip: int = 1):
        """This model's text strategy (library/models/text.py, text_sdxl.py)."""
        return self.family.prompt_encoder(self, max_token_length, clip_skip)

    @property
    def v_prediction(self) -> bool:
        return self.scheduler_config.get("prediction_type") == "v_prediction"

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _variant_from_text_encoder(text_encoder) -> str:
    # SD2.x's OpenCLIP ViT-H text encoder is 1024 wide and uses GELU; SD1.x's CLIP-L uses quick_gelu.
    return "sd2" if getattr(text_encoder.config, "hidden_act", "quick_gelu") == "gelu" else "sd1"


def _load_diffusers_folder(folder: Path, source: str, variants: dict[str, str | None] | None = None) -> SDModel:
    """`variants`: the weights variant per component (`fp16` loads `model.fp16.safetensors`), for
    hub downloads that hold only such files."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sdxl = (folder / "text_encoder_2").is_dir()  # the StableDiffusionXLPipeline layout
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (("tokenizer_2",) if sdxl else ())
    missing = [sub for sub in parts if not (folder / sub).is_dir()]
    if missing:
        raise UserError(f"{folder}: not a diffusers Stable Diffusion folder (missing {', '.join(missing)})")
    variant = (variants or {}).get
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", variant=variant("text_encoder"))
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", variant=variant("unet"))
        vae = AutoencoderKL.from_pretrained(folder / "vae", variant=variant("vae"))
        scheduler_config = dict(DDPMScheduler.load_config(folder / "scheduler"))
        if sdxl:
            tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", variant=variant("text_encoder_2"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: cannot load the model ({e})") from None
    if sdxl:
        return SDModel(tokenizer, text_encoder, unet, vae, scheduler_config, source, "sdxl", text_encoder_2, tokenizer_2)
    return SDModel(tokenizer, text_encoder, unet, vae, scheduler_config, source, _variant_from_text_encoder(text_encoder))


def _load_single_file(path: Path, v_prediction: bool | None) -> SDModel:
    from library.models.checkpoints import load_single_file, read_state_dict
    from library.models.sdxl_checkpoint import is_sdxl_state_dict, load_sdxl_single_file

    state = read_state_dict(path)  # read once: the architecture is told from the tensors
    if is_sdxl_state_dict(state[0]):
        unet, vae, te, te2, tok, tok2, scheduler, _ = load_sdxl_single_file(*state, path, v_prediction=v_prediction)
        return SDModel(tok, te, unet, vae, dict(scheduler.config), str(path), "sdxl", te2, tok2)
    unet, vae, text_encoder, tokenizer, scheduler, info = load_single_file(path, v_prediction=v_prediction, state=state)
    return SDModel(tokenizer, text_encoder, unet, vae, dict(scheduler.config), str(path), info.architecture)


def load_sd_model(name_or_path: str, v_prediction: bool | None = None) -> SDModel:
    """Load SD1.x/SD2.x/SDXL; `v_prediction` (the user's flag) overrides what the files say."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        model = _load_diffusers_folder(path, name_or_path)
    elif path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"{path}: expected a diffusers folder or a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint")
        model = _load_single_file(path, v_prediction)
    elif "/" in name_or_path and not name_or_path.startswith((".", "/", "~")) and name_or_path.count("/") == 1:
        from library.models.hub import download_pipeline

        folder, variants = download_pipeline(name_or_path)
        model = _load_diffusers_folder(folder, name_or_path, variants)
    else:
        raise UserError(f"model not found: {name_or_path} (no such file or folder)")
    if v_prediction is not None:
        model.scheduler_config["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    return model


def move(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """`.to(device, dtype)`, casting only when the dtype changes."""
    if next(module.parameters()).dtype == dtype:
        return module.to(device)
    return module.to(device, dtype=dtype)


def load_for_inference(
    name_or_path: str,
    *,
    v_prediction: bool | None,
    vae: str,
    lora_files: list[str],
    lora_multipliers: list[float],
    device: torch.device,
    dtype: torch.dtype,
    attention: str = "sdpa",
) -> SDModel:
    """The model as gen_pfg.py and eval_pfg.py use it: VAE override, LoRA files applied, every
    part on the device in eval mode."""
    model = load_sd_model(name_or_path, v_prediction)
    if vae:
        from library.models.checkpoints import load_vae

        model.vae = load_vae(vae)
    from library.models.attention import set_attention_backend
    from library.models.lora import apply_lora_files

    apply_lora_files(model, lora_files, lora_multipliers)
    for module in (model.unet, model.vae, model.text_encoder, getattr(model, "text_encoder_2", None)):
        if module is not None:  # text_encoder_2: SDXL only
            move(module, device, dtype).eval()
    set_attention_backend(model.unet, attention)
    return model


def load_sd_vae(name_or_path: str) -> torch.nn.Module:
    """The VAE of an SD model, frozen, in fp32 (the weights as the file holds them, so its id, a
    weight hash, matches the trainer's): a diffusers folder's `vae/` alone (fast), else the whole
    model loaded and its VAE kept. `library.models.checkpoints.load_vae` reads a VAE on its own
    (a `--vae` file or folder) instead."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(path / "vae")
        except (OSError, ValueError) as e:
            raise UserError(f"{path / 'vae'}: cannot load the VAE ({e})") from None
    else:
        vae = load_sd_model(name_or_path).vae
    return vae.requires_grad_(False).eval()
