"""Loading Stable Diffusion components from what users have: a diffusers folder, a single-file
checkpoint (original LDM layout) or a hub id.

Local paths never touch the network. Single files are handled by `library.checkpoints`.
"""
from __future__ import annotations

import os
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
    def is_sdxl(self) -> bool:
        return self.variant == "sdxl"

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


def _load_diffusers_folder(folder: Path, source: str) -> SDModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sdxl = (folder / "text_encoder_2").is_dir()  # the StableDiffusionXLPipeline layout
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (("tokenizer_2",) if sdxl else ())
    missing = [sub for sub in parts if not (folder / sub).is_dir()]
    if missing:
        raise UserError(f"{folder}: not a diffusers Stable Diffusion folder (missing {', '.join(missing)})")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        vae = AutoencoderKL.from_pretrained(folder / "vae")
        scheduler_config = dict(DDPMScheduler.load_config(folder / "scheduler"))
        if sdxl:
            tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: cannot load the model ({e})") from None
    if sdxl:
        return SDModel(tokenizer, text_encoder, unet, vae, scheduler_config, source, "sdxl", text_encoder_2, tokenizer_2)
    return SDModel(tokenizer, text_encoder, unet, vae, scheduler_config, source, _variant_from_text_encoder(text_encoder))


def _load_single_file(path: Path, v_prediction: bool | None) -> SDModel:
    from library.checkpoints import load_single_file, read_state_dict
    from library.sdxl_checkpoint import is_sdxl_state_dict, load_sdxl_single_file

    state = read_state_dict(path)  # read once: the architecture is told from the tensors
    if is_sdxl_state_dict(state[0]):
        unet, vae, te, te2, tok, tok2, scheduler, _ = load_sdxl_single_file(*state, path, v_prediction=v_prediction)
        return SDModel(tok, te, unet, vae, dict(scheduler.config), str(path), "sdxl", te2, tok2)
    unet, vae, text_encoder, tokenizer, scheduler, info = load_single_file(path, v_prediction=v_prediction, state=state)
    return SDModel(tokenizer, text_encoder, unet, vae, dict(scheduler.config), str(path), info.architecture)


def _download(repo_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"{repo_id!r} is neither a local path nor reachable: the hub is offline (HF_HUB_OFFLINE=1)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as e:
        raise UserError(f"{repo_id!r} is not a local path and could not be downloaded from the hub ({type(e).__name__}: {e})") from None


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
        model = _load_diffusers_folder(_download(name_or_path), name_or_path)
    else:
        raise UserError(f"model not found: {name_or_path} (no such file or folder)")
    if v_prediction is not None:
        model.scheduler_config["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    return model


def set_attention_backend(unet: torch.nn.Module, backend: str) -> None:
    """`sdpa` (default, torch's fused attention) or `xformers` (CUDA only, optional install)."""
    if backend == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
        return
    if backend != "xformers":
        raise UserError(f"unknown attention backend {backend!r} (choose sdpa or xformers)")
    if not torch.cuda.is_available():
        raise UserError("--xformers needs a CUDA GPU; on this machine use --sdpa (the default)")
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise UserError("--xformers was given but xformers is not installed: pip install xformers (or use --sdpa)") from None
    unet.enable_xformers_memory_efficient_attention()


def apply_lora_files(model: SDModel, files: list[str], multipliers: list[float]) -> None:
    """Load LoRA files onto the UNet and text encoder, mixed with their multipliers.

    kohya-format files (`lora_unet_*`/`lora_te_*`, ours or made elsewhere) go through
    `library.lora`, which keeps every layer's alpha and checks the file against the model;
    diffusers/peft-format files go through diffusers' `load_lora_weights`.
    """
    if not files:
        return
    from library.lora import is_kohya_file, load_kohya_lora, set_multipliers

    names = [f"lora{index}" for index in range(len(files))]
    for name, file in zip(names, files):
        if is_kohya_file(file):
            load_kohya_lora(file, model.unet, model.text_encoder, name, model.text_encoder_2)
        else:
            _load_diffusers_lora(model, file, name)
    roots = [m for m in (model.unet, model.text_encoder, model.text_encoder_2) if m is not None]
    set_multipliers(roots, dict(zip(names, multipliers or [1.0] * len(names))))


def _load_diffusers_lora(model: SDModel, file: str, name: str) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if model.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
            tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=None,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
            scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    try:
        pipe.load_lora_weights(file, adapter_name=name)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise UserError(f"{file}: cannot load as a LoRA for this model ({type(e).__name__}: {e})") from None


def move(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """`.to(device, dtype)`, casting only when the dtype changes (diffusers warns on every cast)."""
    current = next(module.parameters()).dtype
    return module.to(device) if current == dtype else module.to(device, dtype=dtype)


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
        from library.checkpoints import load_vae

        model.vae = load_vae(vae)
    apply_lora_files(model, lora_files, lora_multipliers)
    for module in (model.unet, model.vae, model.text_encoder, getattr(model, "text_encoder_2", None)):
        if module is not None:  # text_encoder_2: SDXL only
            move(module, device, dtype).eval()
    set_attention_backend(model.unet, attention)
    return model
