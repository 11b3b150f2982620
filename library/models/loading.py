"""Loading Stable Diffusion components from what users have: a diffusers folder, a single-file
checkpoint (original LDM layout) or a hub id.

Local paths never touch the network. Single files are handled by `library.models.checkpoints`. A hub
id downloads only what the loader reads (`select_pipeline_files`: configs, tokenizers and one
weights variant per component) into the Hugging Face cache, which serves it again offline.
"""
from __future__ import annotations

import json
import os
import re
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


# ------------------------------------------------------------------------------------ hub ids
# What the loader reads from a pipeline repo; a safety checker, feature extractor or image encoder
# in model_index.json is never downloaded.
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
REQUIRED_PARTS = PIPELINE_PARTS[:5]
# Weight files inside a component folder: `diffusion_pytorch_model[.VARIANT][-00001-of-00002].safetensors`
# (diffusers), `model[.VARIANT].safetensors` / `pytorch_model[.VARIANT].bin` (transformers).
_WEIGHT_FILE = re.compile(
    r"^(?:diffusion_pytorch_model|pytorch_model|model)(?:\.(?P<variant>\w+))?(?:-\d{5}-of-\d{5})?\.(?P<format>safetensors|bin)$"
)
# One variant per component: the plain (fp32, non-EMA) weights first, half precision next, EMA last.
_VARIANT_ORDER = (None, "non_ema", "fp16", "bf16")


def _weight_rank(key: tuple[str, str | None]) -> tuple:
    file_format, variant = key
    if variant in _VARIANT_ORDER:
        order = _VARIANT_ORDER.index(variant)
    else:
        order = len(_VARIANT_ORDER) + (1 if "ema" in variant.split("_") else 0)
    return (file_format != "safetensors", order, variant or "")


def select_pipeline_files(repo_id: str, names: list[str], model_index: dict) -> tuple[list[str], dict[str, str | None]]:
    """The files of a diffusers pipeline repo the loader needs, and the weights variant chosen per
    component (None: the plain files). Configs and tokenizer files of the used components, and one
    set of weights each; other variants, EMA copies, single files at the root and unused
    components (safety checker, ...) are left on the hub."""
    parts = [p for p in PIPELINE_PARTS if isinstance(model_index.get(p), list) and model_index[p][:1] != [None]]
    missing = [p for p in REQUIRED_PARTS if p not in parts]
    if missing:
        kind = model_index.get("_class_name", "pipeline")
        raise UserError(f"{repo_id}: model_index.json describes a {kind} without {', '.join(missing)}; "
                        "expected a Stable Diffusion 1.x/2.x/XL pipeline")
    chosen: list[str] = []
    variants: dict[str, str | None] = {}
    for part in parts:
        inside = sorted(n for n in names if n.startswith(part + "/") and n.count("/") == 1)
        chosen += [n for n in inside if n.endswith((".json", ".txt"))]
        if part.startswith(("tokenizer", "scheduler")):
            continue
        groups: dict[tuple[str, str | None], list[str]] = {}
        for name in inside:
            match = _WEIGHT_FILE.match(name.split("/", 1)[1])
            if match:
                groups.setdefault((match["format"], match["variant"]), []).append(name)
        if not groups:
            raise UserError(f"{repo_id}: {part}/ holds no weights (diffusion_pytorch_model/model .safetensors or .bin)")
        best = min(groups, key=_weight_rank)
        chosen += groups[best]
        variants[part] = best[1]
    return chosen, variants


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _cached_pipeline(repo_id: str, reason: str) -> tuple[Path, dict[str, str | None]]:
    """The copy of `repo_id` in the local Hugging Face cache (what an earlier download left)."""
    import huggingface_hub

    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, or a cache the hub library cannot read
        raise UserError(f"{repo_id!r} is neither a local path nor in the local Hugging Face cache, and {reason}") from None
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    if "model_index.json" not in names:
        raise UserError(f"{repo_id}: the cached copy in {folder} has no model_index.json ({reason})")
    _, variants = select_pipeline_files(f"{repo_id} (cached in {folder})", names, json.loads((folder / "model_index.json").read_text()))
    print(f"{repo_id}: using the cached copy in {folder} ({reason})")
    return folder, variants


def _download(repo_id: str) -> tuple[Path, dict[str, str | None]]:
    """Download what `select_pipeline_files` picks from a hub pipeline repo into the Hugging Face
    cache; offline (HF_HUB_OFFLINE=1) or with the hub unreachable, use the cached copy if any."""
    if _hub_offline():
        return _cached_pipeline(repo_id, "the hub is offline (HF_HUB_OFFLINE=1)")
    import huggingface_hub
    from huggingface_hub import errors

    try:
        info = huggingface_hub.model_info(repo_id, files_metadata=True)
    except errors.GatedRepoError:
        raise UserError(f"{repo_id}: the model is gated; accept its terms on the hub and log in (hf auth login)") from None
    except (errors.RepositoryNotFoundError, errors.HFValidationError):
        raise UserError(f"model not found: {repo_id} (no such file or folder, and no such model on the hub, "
                        "or it is private: log in with hf auth login)") from None
    except Exception as e:  # no connection, proxy, timeout: an earlier download may still be cached
        return _cached_pipeline(repo_id, f"the hub cannot be reached ({type(e).__name__}: {e})")
    siblings = {s.rfilename: getattr(s, "size", None) for s in (info.siblings or [])}
    if "model_index.json" not in siblings:
        raise UserError(f"{repo_id}: not a diffusers pipeline repo (no model_index.json); for a single-file checkpoint, "
                        "download its .safetensors and pass that path")
    root = _fetch(repo_id, "model_index.json")
    files, variants = select_pipeline_files(repo_id, list(siblings), json.loads((root / "model_index.json").read_text()))
    total = sum(siblings[f] or 0 for f in files)
    print(f"{repo_id}: {len(files)} files ({total / 2**30:.2f} GiB) into the Hugging Face cache")
    for name in files:
        if _fetch(repo_id, name) != root:
            raise UserError(f"{repo_id} changed on the hub during the download; run again")
    return root, variants


def _fetch(repo_id: str, name: str) -> Path:
    """One file into the cache; the snapshot folder it lies in."""
    import huggingface_hub

    try:
        local = Path(huggingface_hub.hf_hub_download(repo_id, name))
    except Exception as e:
        raise UserError(f"{repo_id}: downloading {name} failed ({type(e).__name__}: {e}); run again to resume") from None
    return local.parents[len(name.split("/")) - 1]


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
        folder, variants = _download(name_or_path)
        model = _load_diffusers_folder(folder, name_or_path, variants)
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
    `library.models.lora`, which keeps every layer's alpha and checks the file against the model;
    diffusers/peft-format files go through diffusers' `load_lora_weights`.
    """
    if not files:
        return
    from library.models.lora import is_kohya_file, load_kohya_lora, set_multipliers

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
    """`.to(device, dtype)`, casting only when the dtype changes."""
    current = next(module.parameters()).dtype
    if current == dtype:
        return module.to(device)
    from diffusers.utils import logging as diffusers_logging

    # diffusers' .to(dtype) warns about "modules that should be kept in float32" even when there are none.
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return module.to(device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)


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
    apply_lora_files(model, lora_files, lora_multipliers)
    for module in (model.unet, model.vae, model.text_encoder, getattr(model, "text_encoder_2", None)):
        if module is not None:  # text_encoder_2: SDXL only
            move(module, device, dtype).eval()
    set_attention_backend(model.unet, attention)
    return model
