"""Single-file SDXL checkpoints (Stability's original "SGM" layout): detect, load offline, write.

The layout Illustrious/NoobAI/Pony files use, and what A1111, ComfyUI and diffusers
`from_single_file` read: `model.diffusion_model.*` (UNet, with the size/crop embedding as
`label_emb.0.*`), `first_stage_model.*` (VAE), `conditioner.embedders.0.transformer.*` (CLIP ViT-L,
Hugging Face names) and `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG: fused q/k/v,
`text_projection` stored transposed). The UNet and VAE share SD1/SD2's key maps
(`library.models.ldm_keys`); configs come from the tensor shapes, then the diffusers configs we embed in
files we write, then SDXL base's values.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from library.models.checkpoints import (
    _count,
    _derive_text,
    _derive_unet,
    _groups,
    _hints,
    _load_into,
    _prediction_type,
    _resolve,
    _tokenizer,
    _vae_config,
    cast_copy,
    write_checkpoint_file,
)
from library.errors import UserError
from library.fileio import atomic_dir
from library.models.ldm_keys import (
    SD1_TE_PREFIX,
    SD2_TE_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    StateDict,
    _strip_text_model,
    from_ldm,
    openclip_key_map,
    unet_to_ldm,
    vae_to_ldm,
)

TE1_PREFIX = "conditioner.embedders.0.transformer."  # + text_model.* (Hugging Face CLIP names)
TE2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP names
VAE_SCALE = 0.13025

# SDXL base 1.0's configs for what the tensors cannot tell (head counts, flags).
UNET_DEFAULTS: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "attention_head_dim": [5, 10, 20], "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5,
    "norm_num_groups": 32, "sample_size": 128, "upcast_attention": False, "use_linear_projection": True,
}
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "interpolation_type": "linear", "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "leading", "use_karras_sigmas": False, "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True,
}
TEXT_DEFAULTS: dict[str, Any] = {"bos_token_id": 49406, "eos_token_id": 49407, "attention_dropout": 0.0,
                                 "initializer_factor": 1.0, "layer_norm_eps": 1e-5}


@dataclass(frozen=True)
class SDXLCheckpointInfo:
    path: Path
    prediction_type: str
    prediction_source: str
    metadata: dict[str, str] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    architecture: str = "sdxl"


def is_sdxl_state_dict(state_dict: StateDict) -> bool:
    """SDXL base layout: the bigG embedder (SDXL refiner files have only embedders.0.model and are not SDXL base)."""
    return any(k.startswith(TE2_PREFIX) for k in state_dict) or (
        f"{UNET_PREFIX}label_emb.0.0.weight" in state_dict and any(k.startswith(TE1_PREFIX) for k in state_dict)
    )


# --------------------------------------------------------------------------------------- keys
def _bigg_to_ldm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> `conditioner.embedders.1.model.*` (fused q/k/v, projection transposed)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    weights = {k: v for k, v in state_dict.items() if not k.endswith("position_ids") and k != "text_projection.weight"}
    for k, ldm in openclip_key_map(weights).items():
        if ".attn.in_proj_" in ldm:
            fused.setdefault(ldm, {})[_strip_text_model(k).split(".")[-2][0]] = state_dict[k]
        else:
            out[TE2_PREFIX + ldm] = state_dict[k]
    for ldm, parts in fused.items():
        out[TE2_PREFIX + ldm] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    projection = state_dict["text_projection.weight"]
    out[TE2_PREFIX + "text_projection"] = projection.T.contiguous()  # OpenCLIP computes x @ text_projection
    out[TE2_PREFIX + "logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=projection.dtype)  # CLIP's init value
    return out


def _clip_l_to_ldm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    out = {f"{TE1_PREFIX}text_model.{_strip_text_model(k)}": v for k, v in state_dict.items()}
    positions = out[f"{TE1_PREFIX}text_model.embeddings.position_embedding.weight"].shape[0]
    out[f"{TE1_PREFIX}text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def sdxl_checkpoint_state_dict(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """All tensors of an SDXL single file, named as A1111/ComfyUI/diffusers read them (the models'
    own tensors where the layouts agree; the bigG's fused q/k/v are new)."""
    return {**unet_to_ldm(unet.state_dict()), **vae_to_ldm(vae.state_dict()),
            **_clip_l_to_ldm(text_encoder.state_dict()), **_bigg_to_ldm(text_encoder_2.state_dict())}


def _as_sd_text_keys(sd: StateDict, prefix: str, target: str) -> dict[str, torch.Tensor]:
    """SDXL's embedder keys renamed to SD1's/SD2's, so the shared text maps read them."""
    return {target + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------ configs
def _unet_config(sd: StateDict, hint: dict | None, pooled_dim: int) -> dict[str, Any]:
    derived = _derive_unet(sd)
    first = [(derived["layers_per_block"] + 1) * i + 1 for i in range(len(derived["block_out_channels"]))]
    derived["transformer_layers_per_block"] = [
        _count(sd, re.escape(UNET_PREFIX) + rf"input_blocks\.{b}\.1\.transformer_blocks\.(\d+)\.") or 1 for b in first
    ]
    projection_input = int(sd[f"{UNET_PREFIX}label_emb.0.0.weight"].shape[1])
    derived["projection_class_embeddings_input_dim"] = projection_input
    derived["addition_time_embed_dim"] = (projection_input - pooled_dim) // 6  # pooled text + 6 embedded numbers
    channels = derived["block_out_channels"]
    fallback = {**UNET_DEFAULTS, "norm_num_groups": _groups(channels),
                "attention_head_dim": [max(1, c // 64) if c % 64 == 0 else 1 for c in channels]}  # 64-wide heads
    return _resolve(derived, hint, fallback)


def _text_configs(sd: StateDict, hints: Mapping[str, dict]) -> tuple[dict, dict]:
    first = _derive_text(_as_sd_text_keys(sd, TE1_PREFIX + "text_model.", SD1_TE_PREFIX), "sd1")
    second_sd = _as_sd_text_keys(sd, TE2_PREFIX, SD2_TE_PREFIX)
    second = _derive_text(second_sd, "sd2")
    # SDXL uses every bigG layer (the penultimate one for the states, the last for the pooled vector).
    second["num_hidden_layers"] += 1
    second["projection_dim"] = int(sd[TE2_PREFIX + "text_projection"].shape[1])
    configs = []
    for derived, act, hint in ((first, "quick_gelu", hints.get("text_encoder")), (second, "gelu", hints.get("text_encoder_2"))):
        hidden = derived["hidden_size"]
        fallback = {**TEXT_DEFAULTS, "hidden_act": act, "num_attention_heads": hidden // 64 if hidden % 64 == 0 else 1,
                    "projection_dim": derived.get("projection_dim", 768), "pad_token_id": 1}
        configs.append(_resolve(derived, hint, fallback))
    return configs[0], configs[1]


# ----------------------------------------------------------------------------------- building
def _build_text(cls_name: str, sd: StateDict, config: dict, component: str, dtype, source: str):
    from accelerate import init_empty_weights
    import transformers

    with init_empty_weights():
        model = getattr(transformers, cls_name)(transformers.CLIPTextConfig.from_dict(config))
    if component == "sd1":
        return _load_into(model, sd, "sd1", dtype, source)
    template = {k: v for k, v in model.state_dict().items() if k != "text_projection.weight"}
    tensors, missing = from_ldm(sd, template, "sd2")
    projection = sd.get(SD2_TE_PREFIX + "text_projection")
    if missing or projection is None:
        raise UserError(f"{source}: tensors of the second (bigG) text encoder are missing, e.g. "
                        f"{', '.join((missing or ['text_projection'])[:3])}; the file is damaged")
    tensors["text_projection.weight"] = projection.T.contiguous()
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)  # position_ids stays the model's buffer
    return model.eval()


def load_sdxl_single_file(sd: StateDict, metadata: Mapping[str, str], path: str | Path, v_prediction: bool | None = None,
                          dtype: torch.dtype | None = torch.float32, config_dir: str | Path | None = None):
    """(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, info) from SDXL tensors, offline."""
    import diffusers

    from library.models.checkpoints import _build_unet, _build_vae

    path = Path(path)
    source = str(path)
    for prefix, what in ((TE1_PREFIX, "CLIP-L text encoder"), (TE2_PREFIX, "bigG text encoder"), (VAE_PREFIX, "VAE")):
        if not any(k.startswith(prefix) for k in sd):
            raise UserError(f"{path}: the SDXL checkpoint has no {what} ({prefix}*); use a full SDXL checkpoint")
    hints = _hints(metadata, None)
    if config_dir is not None:
        folder = Path(config_dir)
        files = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
                 "text_encoder_2": "text_encoder_2/config.json", "scheduler": "scheduler/scheduler_config.json"}
        hints = {c: json.loads((folder / f).read_text()) for c, f in files.items() if (folder / f).is_file()}
    te1_sd = _as_sd_text_keys(sd, TE1_PREFIX + "text_model.", SD1_TE_PREFIX)
    te2_sd = _as_sd_text_keys(sd, TE2_PREFIX, SD2_TE_PREFIX)
    try:
        te1_config, te2_config = _text_configs(sd, hints)
        configs = {"unet": _unet_config(sd, hints.get("unet"), te2_config["projection_dim"]),
                   "vae": _vae_config(sd, "sd1", hints.get("vae")),
                   "text_encoder": te1_config, "text_encoder_2": te2_config}
    except (KeyError, StopIteration) as e:
        raise UserError(f"{path}: incomplete SDXL checkpoint (cannot find {e})") from None
    if not hints.get("vae"):
        configs["vae"].update(scaling_factor=VAE_SCALE, force_upcast=True, sample_size=1024)
    unet = _build_unet(sd, configs["unet"], dtype, source)
    vae = _build_vae(sd, configs["vae"], dtype, source)
    text_encoder = _build_text("CLIPTextModel", te1_sd, te1_config, "sd1", dtype, source)
    text_encoder_2 = _build_text("CLIPTextModelWithProjection", te2_sd, te2_config, "sd2", dtype, source)
    tokenizer = _tokenizer("sd1", te1_config["max_position_embeddings"])
    tokenizer_2 = _tokenizer("sd2", te2_config["max_position_embeddings"])  # bigG pads with "!"

    sched_config = hints.get("scheduler") or SCHEDULER_DEFAULTS
    if v_prediction is None and "v_pred" in sd:  # NoobAI-style v-prediction files mark themselves with this key
        prediction, pred_source = "v_prediction", "metadata"
    else:
        # As SD1.x, SDXL without a record is epsilon.
        prediction, pred_source = _prediction_type(v_prediction, metadata, hints.get("scheduler"), "sd1", source)
    scheduler_cls = getattr(diffusers, sched_config.get("_class_name", ""), diffusers.EulerDiscreteScheduler)
    scheduler = scheduler_cls.from_config({**sched_config, "prediction_type": prediction})
    configs["scheduler"] = dict(scheduler.config)
    info = SDXLCheckpointInfo(path, prediction, pred_source, dict(metadata), configs)
    return unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, info


# ------------------------------------------------------------------------------------ writing
def save_sdxl_single_file(path: str | Path, unet, vae, text_encoder, text_encoder_2, dtype: torch.dtype | None = None,
                          metadata: dict[str, str] | None = None, scheduler: Any | None = None) -> Path:
    """Write an SDXL `.safetensors` (or `.ckpt`) in the original layout, atomically, with our
    diffusers configs in the metadata so our loader rebuilds exactly these models."""
    tensors = sdxl_checkpoint_state_dict(unet, vae, text_encoder, text_encoder_2)
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "scheduler": scheduler}
    return write_checkpoint_file(path, tensors, models, metadata, dtype)


def save_sdxl_diffusers(folder: str | Path, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                        dtype: torch.dtype | None = None) -> Path:
    """`--save_model_as diffusers` for SDXL: a StableDiffusionXLPipeline folder, written atomically."""
    from diffusers import StableDiffusionXLPipeline

    if dtype is not None:  # cast copies: the caller's models keep their training dtype
        unet, vae, text_encoder, text_encoder_2 = (cast_copy(m, dtype) for m in (unet, vae, text_encoder, text_encoder_2))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    with atomic_dir(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)
