"""Key maps between diffusers' state dicts and the original (LDM) single-file layout of SD1.x/SD2.x.

The original layout is what A1111, ComfyUI and diffusers `from_single_file` read:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and `cond_stage_model.*` (text
encoder: OpenAI CLIP for SD1.x, OpenCLIP for SD2.x). Each map is computed from the diffusers key
names alone, so one function serves both directions and tiny models map like real ones.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TE_PREFIX = "cond_stage_model.model."

StateDict = Mapping[str, torch.Tensor]

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               # SDXL's size/crop + pooled-text embedding ("text_time")
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _max_index(keys: Iterable[str], pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) if found else -1


def _split_param(rest: str) -> tuple[str, str]:
    """'norm1.weight' -> ('norm1', 'weight')."""
    module, _, param = rest.rpartition(".")
    return module, param


# ----------------------------------------------------------------------------------------- UNet
def unet_key_map(diffusers_keys: Iterable[str]) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> LDM key (without the `model.diffusion_model.` prefix)."""
    keys = list(diffusers_keys)
    stride = _max_index(keys, r"down_blocks\.\d+\.resnets\.(\d+)\.") + 2  # layers_per_block + 1
    up_with_attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}

    def resnet(rest: str) -> str:
        module, param = _split_param(rest)
        return f"{_UNET_RESNET[module]}.{param}"

    def convert(key: str) -> str:
        module, param = _split_param(key)
        if module in _UNET_FIXED:
            return f"{_UNET_FIXED[module]}.{param}"
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            return f"input_blocks.{stride * i + j + 1}.0.{resnet(rest)}"
        if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            return f"input_blocks.{stride * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
        if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            return f"input_blocks.{stride * (int(m[1]) + 1)}.0.op.{m[2]}"
        if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
        if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            return f"middle_block.1.{m[1]}"
        if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            return f"output_blocks.{stride * int(m[1]) + int(m[2])}.0.{resnet(m[3])}"
        if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            return f"output_blocks.{stride * int(m[1]) + int(m[2])}.1.{m[3]}"
        if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            i = int(m[1])
            # The upsampler follows the attention in LDM's output block when the block has one.
            return f"output_blocks.{stride * i + stride - 1}.{2 if i in up_with_attn else 1}.conv.{m[2]}"
        raise KeyError(f"no LDM name for UNet key {key!r} (only SD1.x/SD2.x UNets are supported)")

    return {k: convert(k) for k in keys}


def unet_to_ldm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict -> `model.diffusion_model.*` tensors."""
    return {UNET_PREFIX + ldm: state_dict[k] for k, ldm in unet_key_map(state_dict).items()}


# ------------------------------------------------------------------------------------------ VAE
def vae_key_map(diffusers_keys: Iterable[str]) -> dict[str, str]:
    """diffusers AutoencoderKL key -> LDM key (without the `first_stage_model.` prefix)."""
    keys = list(diffusers_keys)
    num_blocks = _max_index(keys, r"encoder\.down_blocks\.(\d+)\.") + 1

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut")

    def convert(key: str) -> str:
        if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            return f"{m[1]}.norm_out.{m[2]}"
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            return f"encoder.down.{m[1]}.downsample.{m[2]}"
        # LDM numbers decoder levels from the lowest resolution up; diffusers the other way.
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            return f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.{m[2]}"
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            module, param = _split_param(m[2])
            return f"{m[1]}.mid.attn_1.{_VAE_ATTN[module]}.{param}"
        if re.match(r"(encoder\.|decoder\.)?(conv_in|conv_out|quant_conv|post_quant_conv)\.", key):
            return key
        raise KeyError(f"no LDM name for VAE key {key!r}")

    return {k: convert(k) for k in keys}


def _is_vae_attn_weight(ldm_key: str) -> bool:
    return ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and ".norm." not in ldm_key


def vae_to_ldm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """diffusers VAE state dict -> `first_stage_model.*` tensors (attention as 1x1 convs, as LDM has them)."""
    out = {}
    for k, ldm in vae_key_map(state_dict).items():
        t = state_dict[k]
        if _is_vae_attn_weight(ldm) and t.ndim == 2:
            t = t[:, :, None, None]
        out[VAE_PREFIX + ldm] = t
    return out


# --------------------------------------------------------------------------------- text encoder
def _strip_text_model(key: str) -> str:
    # transformers < 5.6 nests CLIPTextModel's weights under `text_model.`; later versions do not.
    return key.removeprefix("text_model.")


def openclip_key_map(diffusers_keys: Iterable[str]) -> dict[str, str]:
    """CLIPTextModel key -> OpenCLIP key (without `cond_stage_model.model.`).

    q/k/v projections all map to the fused `attn.in_proj_*` tensor (rows q, then k, then v).
    """
    def convert(key: str) -> str:
        key = _strip_text_model(key)
        if key == "embeddings.token_embedding.weight":
            return "token_embedding.weight"
        if key == "embeddings.position_embedding.weight":
            return "positional_embedding"
        if key.startswith("final_layer_norm."):
            return "ln_final." + key.removeprefix("final_layer_norm.")
        if m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$", key):
            return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[2]}"
        if m := re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
            return f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"
        raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")

    return {k: convert(k) for k in diffusers_keys}


def text_encoder_to_ldm(state_dict: StateDict, variant: str) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict -> `cond_stage_model.*` tensors for `variant` "sd1" or "sd2".

    SD2 follows kohya's export: diffusers keeps the 23 layers SD2 uses (it reads the penultimate
    layer of OpenCLIP's 24), so the unused last resblock is written as a copy of the one before,
    plus an identity `text_projection` and `logit_scale`, giving the full OpenCLIP key set
    that A1111 and ComfyUI load without missing keys.
    """
    if variant == "sd1":
        out = {SD1_TE_PREFIX + _strip_text_model(k): v for k, v in state_dict.items()}
        max_pos = out[SD1_TE_PREFIX + "embeddings.position_embedding.weight"].shape[0]
        out[SD1_TE_PREFIX + "embeddings.position_ids"] = torch.arange(max_pos, dtype=torch.int64)[None]
        return out
    if variant != "sd2":
        raise ValueError(f"unknown variant {variant!r}")
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    weights = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}  # a buffer, not a weight
    for k, ldm in openclip_key_map(weights).items():
        if ".attn.in_proj_" in ldm:
            fused.setdefault(ldm, {})[_strip_text_model(k).split(".")[-2][0]] = state_dict[k]
        else:
            out[SD2_TE_PREFIX + ldm] = state_dict[k]
    for ldm, parts in fused.items():
        out[SD2_TE_PREFIX + ldm] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    last = _max_index(out, re.escape(SD2_TE_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    src = f"{SD2_TE_PREFIX}transformer.resblocks.{last}."
    for key in [k for k in out if k.startswith(src)]:
        out[key.replace(f".resblocks.{last}.", f".resblocks.{last + 1}.")] = out[key].clone()
    hidden = out[SD2_TE_PREFIX + "token_embedding.weight"].shape[1]
    dtype = out[SD2_TE_PREFIX + "token_embedding.weight"].dtype
    out[SD2_TE_PREFIX + "text_projection"] = torch.eye(hidden, dtype=dtype)
    out[SD2_TE_PREFIX + "logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=dtype)  # CLIP's init value
    return out


# ------------------------------------------------------------------------ LDM -> diffusers
def _take(ldm_sd: StateDict, ldm_key: str, target: torch.Tensor, missing: list[str]) -> torch.Tensor | None:
    t = ldm_sd.get(ldm_key)
    if t is None:
        missing.append(ldm_key)
        return None
    if t.shape != target.shape and t.numel() == target.numel():
        t = t.reshape(target.shape)  # VAE attention: 1x1 conv <-> linear
    if t.shape != target.shape:
        raise ValueError(f"{ldm_key}: shape {tuple(t.shape)} does not fit the model's {tuple(target.shape)}")
    return t


def from_ldm(ldm_sd: StateDict, template: StateDict, component: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pick the tensors of a diffusers model (its `template` state dict, e.g. on the meta device)
    out of an LDM state dict. `component` is "unet", "vae", "sd1" or "sd2" (text encoders).

    Returns the diffusers state dict and the LDM keys that were missing.
    """
    missing: list[str] = []
    out: dict[str, torch.Tensor] = {}
    if component == "sd2":
        for k, ldm in openclip_key_map(template).items():
            t = ldm_sd.get(SD2_TE_PREFIX + ldm)
            if t is None:
                missing.append(SD2_TE_PREFIX + ldm)
                continue
            if ".attn.in_proj_" in ldm:
                t = t.chunk(3, dim=0)["qkv".index(_strip_text_model(k).split(".")[-2][0])]
            out[k] = _take({"t": t}, "t", template[k], missing)
        return out, missing
    if component == "sd1":
        names = {k: SD1_TE_PREFIX + _strip_text_model(k) for k in template}
    elif component == "unet":
        names = {k: UNET_PREFIX + v for k, v in unet_key_map(template).items()}
    elif component == "vae":
        names = {k: VAE_PREFIX + v for k, v in vae_key_map(template).items()}
    else:
        raise ValueError(f"unknown component {component!r}")
    for k, ldm in names.items():
        t = _take(ldm_sd, ldm, template[k], missing)
        if t is not None:
            out[k] = t
    return out, missing
