"""Single-file Stable Diffusion checkpoints (SD1.x/SD2.x, original LDM layout): read, detect, build, write.

Loading is offline: configs come from the tensors' shapes, then from the diffusers configs we embed
in files we write (metadata key `pfg.diffusers_config`), then from the bundled real SD1.5/SD2.1
configs in `configs/`. Pickled `.ckpt` files are only ever read with
`torch.load(weights_only=True)`, so no code inside them runs.
"""
from __future__ import annotations

import copy
import json
import logging
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from library.models.clip_vocab import write_clip_tokenizer_files
from library.errors import UserError
from library.fileio import atomic_dir, atomic_path
from library.tensor_files import TORCH_LOAD_ERRORS, read_safetensors, safetensors_errors
from library.models.ldm_keys import (
    SD1_TE_PREFIX,
    SD2_TE_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    StateDict,
    from_ldm,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)

__all__ = [
    "CheckpointInfo", "bundled_config", "checkpoint_state_dict", "detect_architecture", "load_single_file", "load_vae",
    "read_state_dict", "save_diffusers", "save_single_file", "text_encoder_to_ldm", "unet_to_ldm", "vae_to_ldm",
]

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    LoadedModel = tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, SchedulerMixin,
                        "CheckpointInfo"]

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_METADATA_KEY = "pfg.diffusers_config"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!"}
COMPONENT_FILES = {"unet": "unet/config.json", "vae": "vae/config.json",
                   "text_encoder": "text_encoder/config.json", "scheduler": "scheduler/scheduler_config.json"}


@dataclass(frozen=True)
class CheckpointInfo:
    """What load_single_file found out about a checkpoint, and where each answer came from."""

    path: Path
    architecture: str  # "sd1" | "sd2"
    prediction_type: str  # "epsilon" | "v_prediction"
    prediction_source: str  # "flag" | "metadata" | "default"
    metadata: dict[str, str] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"


def bundled_config(variant: str, component: str) -> dict[str, Any]:
    """The real SD1.5 ("sd1") or SD2.1 ("sd2") diffusers config of a component, shipped with the project."""
    return json.loads((CONFIG_DIR / variant / COMPONENT_FILES[component]).read_text())


# ------------------------------------------------------------------------------------ reading
def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a `.safetensors` or (weights-only) `.ckpt`/`.pt` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return read_safetensors(path)
        except safetensors_errors() as e:  # damaged header, truncated, unreadable
            raise UserError(f"{path}: not a readable .safetensors file ({e})") from None
    if suffix not in PICKLE_SUFFIXES:
        raise UserError(f"{path}: unknown checkpoint format {suffix!r}; use .safetensors, .ckpt or .pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: refused to load: the pickle holds objects other than plain tensors ({reason}). "
            "Pickled checkpoints are read with weights_only=True so no code inside them runs; "
            "convert this file to .safetensors with a tool you trust."
        ) from None
    except TORCH_LOAD_ERRORS as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    metadata: dict[str, str] = {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if isinstance(obj.get("metadata"), dict):
            metadata = {str(k): str(v) for k, v in obj["metadata"].items()}
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, metadata


def _normalize_keys(sd: StateDict) -> dict[str, torch.Tensor]:
    """Some older SD1 files lack the `text_model.` level in the CLIP keys."""
    old = "cond_stage_model.transformer."
    if any(k.startswith(SD1_TE_PREFIX) for k in sd) or not any(k.startswith(old) for k in sd):
        return dict(sd)
    return {(SD1_TE_PREFIX + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}


def detect_architecture(state_dict: StateDict, source: str = "checkpoint") -> str:
    """Tell "sd1" from "sd2" by the tensors of an LDM-layout checkpoint; UserError for anything else."""
    keys = state_dict.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise UserError(f"{source}: this is an SDXL-family checkpoint, not SD1.x/SD2.x: SDXL base files load through "
                        "library.models.loading.load_sd_model; SDXL refiner files are not supported")
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in state_dict:
        hint = ""
        if any(k.startswith("lora_") for k in keys):
            hint = " (it looks like a LoRA: pass it with --network_weights)"
        elif "conv_in.weight" in state_dict or any(k.startswith("down_blocks.") for k in keys):
            hint = " (it looks like a diffusers-format weight file: pass the whole diffusers folder)"
        raise UserError(f"{source}: not a Stable Diffusion checkpoint: no {UNET_PREFIX}* UNet tensors{hint}")
    if f"{SD2_TE_PREFIX}transformer.resblocks.0.attn.in_proj_weight" in state_dict:
        return "sd2"
    if any(k.startswith(SD1_TE_PREFIX) or k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    # No text encoder: fall back on the UNet's cross-attention width and projection type.
    k_weight = next((v for k, v in state_dict.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = state_dict.get(f"{UNET_PREFIX}input_blocks.1.1.proj_in.weight")
    if k_weight is not None and k_weight.shape[1] == 768:
        return "sd1"
    if k_weight is not None and k_weight.shape[1] == 1024 or proj_in is not None and proj_in.ndim == 2:
        return "sd2"
    raise UserError(f"{source}: not an SD1.x/SD2.x checkpoint (no text encoder and no known cross-attention width)")


# -------------------------------------------------------------------- configs from tensor shapes
def _count(sd: StateDict, pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def _groups(channels: list[int], preferred: int = 32) -> int:
    g = preferred
    while any(c % g for c in channels):
        g //= 2
    return g


def _derive_unet(sd: StateDict) -> dict[str, Any]:
    p = re.escape(UNET_PREFIX)
    ops = sorted(int(m.group(1)) for k in sd if (m := re.match(p + r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    stride = ops[0] if ops else _count(sd, p + r"input_blocks\.(\d+)\.") - 1  # layers_per_block + 1
    levels = len(ops) + 1
    first = [stride * i + 1 for i in range(levels)]
    channels = [int(sd[f"{UNET_PREFIX}input_blocks.{b}.0.out_layers.3.weight"].shape[0]) for b in first]
    has_attn = [f"{UNET_PREFIX}input_blocks.{b}.1.proj_in.weight" in sd for b in first]
    proj_in = next(v for k, v in sd.items() if k.endswith(".proj_in.weight"))
    to_k = next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
    return {
        "in_channels": int(sd[f"{UNET_PREFIX}input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(sd[f"{UNET_PREFIX}out.2.weight"].shape[0]),
        "block_out_channels": channels,
        "layers_per_block": stride - 1,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "cross_attention_dim": int(to_k.shape[1]),
        "use_linear_projection": proj_in.ndim == 2,
        "transformer_layers_per_block": _count(sd, p + r"input_blocks\.1\.1\.transformer_blocks\.(\d+)\.") or 1,
    }


def _derive_vae(sd: StateDict) -> dict[str, Any]:
    p = re.escape(VAE_PREFIX)
    levels = _count(sd, p + r"encoder\.down\.(\d+)\.")
    return {
        "in_channels": int(sd[f"{VAE_PREFIX}encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd[f"{VAE_PREFIX}decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(sd[f"{VAE_PREFIX}decoder.conv_in.weight"].shape[1]),
        "block_out_channels": [int(sd[f"{VAE_PREFIX}encoder.down.{i}.block.0.conv2.weight"].shape[0])
                               for i in range(levels)],
        "layers_per_block": _count(sd, p + r"encoder\.down\.0\.block\.(\d+)\."),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def _derive_text(sd: StateDict, variant: str) -> dict[str, Any]:
    if variant == "sd1":
        p = SD1_TE_PREFIX
        token, fc1 = sd[p + "embeddings.token_embedding.weight"], sd[p + "encoder.layers.0.mlp.fc1.weight"]
        positions = sd[p + "embeddings.position_embedding.weight"].shape[0]
        layers = _count(sd, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    else:
        p = SD2_TE_PREFIX
        token, fc1 = sd[p + "token_embedding.weight"], sd[p + "transformer.resblocks.0.mlp.c_fc.weight"]
        positions = sd[p + "positional_embedding"].shape[0]
        # SD2 conditions on OpenCLIP's penultimate layer, so the diffusers model drops the last one.
        layers = _count(sd, re.escape(p) + r"transformer\.resblocks\.(\d+)\.") - 1
    return {
        "vocab_size": int(token.shape[0]),
        "hidden_size": int(token.shape[1]),
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": layers,
        "max_position_embeddings": int(positions),
    }


def _same(a: Any, b: Any) -> bool:
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def _resolve(derived: dict[str, Any], hint: dict[str, Any] | None, fallback: dict[str, Any]) -> dict[str, Any]:
    """The hint (an embedded or user-given config) wins for what shapes cannot tell, if it agrees with the shapes."""
    if hint and all(_same(hint.get(k, v), v) for k, v in derived.items()):
        return {**hint, **derived}
    return {**fallback, **derived}


def _unet_config(sd: StateDict, variant: str, hint: dict | None) -> dict[str, Any]:
    derived = _derive_unet(sd)
    fallback = bundled_config(variant, "unet")
    channels = derived["block_out_channels"]
    # Head counts are not visible in the weights; keep the real models' rules: SD1 has 8 heads,
    # SD2 64-wide heads. The group-norm size must divide every width.
    if variant == "sd1":
        fallback["attention_head_dim"] = 8 if all(c % 8 == 0 for c in channels) else 1
    else:
        fallback["attention_head_dim"] = [max(1, c // 64) if c % 64 == 0 else 1 for c in channels]
    fallback["norm_num_groups"] = _groups(channels)
    return _resolve(derived, hint, fallback)


def _vae_config(sd: StateDict, variant: str, hint: dict | None) -> dict[str, Any]:
    derived = _derive_vae(sd)
    fallback = {**bundled_config(variant, "vae"), "norm_num_groups": _groups(derived["block_out_channels"])}
    return _resolve(derived, hint, fallback)


def _text_config(sd: StateDict, variant: str, hint: dict | None) -> dict[str, Any]:
    derived = _derive_text(sd, variant)
    fallback = bundled_config(variant, "text_encoder")
    hidden = derived["hidden_size"]
    fallback["num_attention_heads"] = hidden // 64 if hidden % 64 == 0 else 1  # 64-wide heads, as in both real encoders
    fallback["projection_dim"] = hidden if variant == "sd1" else fallback["projection_dim"]
    return _resolve(derived, hint, fallback)


# ---------------------------------------------------------------------------- building models
def _load_into(model: torch.nn.Module, ldm_sd: StateDict, component: str, dtype: torch.dtype | None,
               source: str) -> torch.nn.Module:
    try:
        tensors, missing = from_ldm(ldm_sd, model.state_dict(), component)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    if missing:
        raise UserError(f"{source}: {len(missing)} tensors of the {component} are missing, e.g. "
                        f"{', '.join(missing[:3])}; the file is damaged or not an SD1.x/SD2.x checkpoint")
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def _build_unet(ldm_sd: StateDict, config: dict, dtype: torch.dtype | None, source: str):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        model = UNet2DConditionModel.from_config(config)
    return _load_into(model, ldm_sd, "unet", dtype, source)


def _build_vae(ldm_sd: StateDict, config: dict, dtype: torch.dtype | None, source: str):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        model = AutoencoderKL.from_config(config)
    return _load_into(model, ldm_sd, "vae", dtype, source)


def _build_text_encoder(ldm_sd: StateDict, config: dict, variant: str, dtype: torch.dtype | None, source: str):
    from accelerate import init_empty_weights  # buffers (position_ids) stay real, weights start empty
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        model = CLIPTextModel(CLIPTextConfig.from_dict(config))
    return _load_into(model, ldm_sd, variant, dtype, source)


def _tokenizer(variant: str, max_length: int):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="pfg-tokenizer-") as folder:
        write_clip_tokenizer_files(Path(folder), pad_token=PAD_TOKENS[variant], model_max_length=max_length)
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _prediction_type(flag: bool | None, metadata: Mapping[str, str], hint: dict | None,
                     variant: str, source: str) -> tuple[str, str]:
    if flag is not None:
        return ("v_prediction" if flag else "epsilon"), "flag"
    spec = metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", "metadata"
    if spec == "epsilon":
        return "epsilon", "metadata"
    kohya = metadata.get("ss_v_parameterization", "").strip().lower()
    if kohya in ("true", "false"):
        return ("v_prediction" if kohya == "true" else "epsilon"), "metadata"
    if hint and hint.get("prediction_type") in ("epsilon", "v_prediction"):
        return hint["prediction_type"], "metadata"
    # No record: SD1.x is always epsilon; for SD2.x guess the 768-v models (2.0-v, 2.1), the common base.
    guess = "epsilon" if variant == "sd1" else "v_prediction"
    if variant == "sd2":
        logger.warning("%s: prediction type not recorded; assuming v-prediction (SD2.x 768-v). "
                       "Pass --no-v_parameterization for 512-base (epsilon) SD2 models.", source)
    return guess, "default"


def _hints(metadata: Mapping[str, str], config_dir: Path | None) -> dict[str, dict]:
    if config_dir is not None:
        config_dir = Path(config_dir)
        return {c: json.loads((config_dir / f).read_text()) for c, f in COMPONENT_FILES.items()
                if (config_dir / f).is_file()}
    try:
        embedded = json.loads(metadata.get(CONFIG_METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    return embedded if isinstance(embedded, dict) else {}


def load_single_file(path: str | Path, v_prediction: bool | None = None, dtype: torch.dtype | None = torch.float32,
                     config_dir: str | Path | None = None,
                     state: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None) -> LoadedModel:
    """Build (unet, vae, text_encoder, tokenizer, scheduler, info) from an LDM-layout single file, offline.

    `v_prediction` (the user's flag) beats the file's metadata, which beats the default guess
    (epsilon for SD1.x, v-prediction for SD2.x). `config_dir` (a diffusers folder) overrides the
    configs embedded in the file for what the tensor shapes cannot tell (head counts, norm groups).
    `dtype` casts floating-point weights (None keeps the file's). `state` is the file's
    `read_state_dict` result when the caller already read it.
    """
    import diffusers

    path = Path(path)
    raw, metadata = state if state is not None else read_state_dict(path)
    sd = _normalize_keys(raw)
    variant = detect_architecture(sd, str(path))
    if not any(k.startswith("cond_stage_model.") for k in sd):
        raise UserError(f"{path}: the checkpoint has no text encoder (cond_stage_model.*); use a full SD checkpoint")
    if not any(k.startswith(VAE_PREFIX) for k in sd):
        raise UserError(f"{path}: the checkpoint has no VAE (first_stage_model.*); use a full SD checkpoint")
    hints = _hints(metadata, Path(config_dir) if config_dir else None)
    try:
        configs = {
            "unet": _unet_config(sd, variant, hints.get("unet")),
            "vae": _vae_config(sd, variant, hints.get("vae")),
            "text_encoder": _text_config(sd, variant, hints.get("text_encoder")),
        }
    except (KeyError, StopIteration) as e:
        raise UserError(f"{path}: incomplete Stable Diffusion checkpoint (cannot find {e})") from None
    unet = _build_unet(sd, configs["unet"], dtype, str(path))
    vae = _build_vae(sd, configs["vae"], dtype, str(path))
    text_encoder = _build_text_encoder(sd, configs["text_encoder"], variant, dtype, str(path))
    tokenizer = _tokenizer(variant, configs["text_encoder"]["max_position_embeddings"])

    sched_config = hints.get("scheduler") or bundled_config(variant, "scheduler")
    prediction, source = _prediction_type(v_prediction, metadata, hints.get("scheduler"), variant, str(path))
    scheduler_cls = getattr(diffusers, sched_config.get("_class_name", ""), diffusers.DDIMScheduler)
    scheduler = scheduler_cls.from_config({**sched_config, "prediction_type": prediction})
    configs["scheduler"] = dict(scheduler.config)
    info = CheckpointInfo(path, variant, prediction, source, dict(metadata), configs)
    return unet, vae, text_encoder, tokenizer, scheduler, info


def load_vae(path_or_folder: str | Path, dtype: torch.dtype | None = torch.float32) -> AutoencoderKL:
    """An AutoencoderKL from a diffusers folder (a VAE folder or a full model folder with `vae/`)
    or from a single file with LDM keys (with or without `first_stage_model.`) or diffusers keys."""
    from diffusers import AutoencoderKL

    path = Path(path_or_folder)
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        if sub is None and not (path / "config.json").is_file():
            raise UserError(f"{path}: not a diffusers VAE folder (no config.json)")
        return AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True, dtype=dtype)
    raw, metadata = read_state_dict(path)
    hint = _hints(metadata, None).get("vae")
    if any(k.startswith(VAE_PREFIX) for k in raw):
        sd = {k: v for k, v in raw.items() if k.startswith(VAE_PREFIX)}
    elif "encoder.conv_in.weight" in raw and any(k.startswith("encoder.down_blocks.") for k in raw):
        try:
            sd = vae_to_ldm({k: v for k, v in raw.items() if k.startswith(("encoder.", "decoder.", "quant_conv.",
                                                                           "post_quant_conv."))})
        except KeyError as e:
            raise UserError(f"{path}: unexpected tensor in a diffusers-format VAE: {e}") from None
        beside = path.parent / "config.json"  # a weights file inside a diffusers VAE folder
        hint = hint or (json.loads(beside.read_text()) if beside.is_file() else None)
    elif "encoder.conv_in.weight" in raw:
        sd = {VAE_PREFIX + k: v for k, v in raw.items()}
    else:
        raise UserError(f"{path}: not a VAE: no encoder.conv_in.weight or {VAE_PREFIX}* tensors")
    try:
        config = _vae_config(sd, "sd1", hint)  # SD1 and SD2 share the VAE; only sample_size differs
    except KeyError as e:
        raise UserError(f"{path}: incomplete VAE (cannot find {e})") from None
    return _build_vae(sd, config, dtype, str(path))


# ------------------------------------------------------------------------------------ writing
def _plain_config(config: Any) -> dict[str, Any]:
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(items, default=str))


def checkpoint_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                          variant: str) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint, named as A1111/ComfyUI/diffusers read them: the
    models' own tensors (no copies), cast and moved only as they are written."""
    if variant not in PAD_TOKENS:
        raise ValueError(f"unknown variant {variant!r}")
    return {**unet_to_ldm(unet.state_dict()), **vae_to_ldm(vae.state_dict()),
            **text_encoder_to_ldm(text_encoder.state_dict(), variant)}


def saveable(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors, floating ones cast to `dtype` (None keeps them)."""
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


def save_single_file(path: str | Path, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                     variant: str, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
                     scheduler: Any | None = None) -> Path:
    """Write an LDM-layout `.safetensors` (or `.ckpt`: torch.save of {"state_dict": ...}) atomically.

    The diffusers configs go into the metadata too, so our loader rebuilds exactly these models
    even where the shapes cannot tell (head counts, norm groups, prediction type when `scheduler` is given).
    """
    tensors = checkpoint_state_dict(unet, vae, text_encoder, variant)
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}
    return write_checkpoint_file(path, tensors, models, metadata, dtype)


def write_checkpoint_file(path: str | Path, tensors: dict[str, torch.Tensor], models: dict[str, Any],
                          metadata: dict[str, str] | None, dtype: torch.dtype | None = None) -> Path:
    """Write original-layout tensors (floating ones cast to `dtype`) as `.safetensors` (or `.ckpt`)
    atomically, with the diffusers configs of `models` (name -> model or scheduler, None skipped)
    in the metadata. The safetensors file is streamed one tensor at a time, with the sshs_* hashes
    kohya precomputes (webui extensions need not reread the file); a .ckpt holds a cast copy of
    every tensor while torch.save writes it."""
    path = Path(path)
    configs = {name: _plain_config(m.config) for name, m in models.items() if m is not None}
    meta = {CONFIG_METADATA_KEY: json.dumps(configs), **(metadata or {})}
    if path.suffix.lower() == ".safetensors":
        from library.tensor_files import write_safetensors

        return write_safetensors(path, tensors, meta, dtype=dtype, hashes=True)
    if path.suffix.lower() not in (".ckpt", ".pt"):
        raise UserError(f"{path}: choose a .safetensors or .ckpt file name for the checkpoint")
    with atomic_path(path) as tmp:
        torch.save({"state_dict": saveable(tensors, dtype), "metadata": meta}, tmp)
    return path


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` in `dtype` beside the original, holding nothing but the cast tensors (tensors that
    are already in `dtype` are shared): copy.deepcopy(model).to(dtype) would first copy every
    weight in its training dtype, twice the size of an fp16 save."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        cast = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
        memo[id(tensor)] = torch.nn.Parameter(cast, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else cast
    return copy.deepcopy(model, memo)


def save_diffusers(folder: str | Path, unet, vae, text_encoder, tokenizer, scheduler,
                   dtype: torch.dtype | None = None) -> Path:
    """`--save_model_as diffusers`: a StableDiffusionPipeline folder, written atomically."""
    from diffusers import StableDiffusionPipeline

    if dtype is not None:  # cast copies: the caller's models keep their training dtype
        unet, vae, text_encoder = (cast_copy(m, dtype) for m in (unet, vae, text_encoder))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_dir(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)
