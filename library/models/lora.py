"""LoRA on the UNet, injected with peft and saved in kohya's key layout.

kohya's `networks/lora.py` decides which layers carry a LoRA and how they are named, and A1111,
ComfyUI and diffusers all map exactly those names; we follow it:

- every Linear and 1x1 Conv2d inside a `Transformer2DModel` (attention q/k/v/out, feed-forward,
  proj_in/proj_out) gets rank `dim`;
- with a conv rank, the layers inside `ResnetBlock2D`, `Downsample2D` and `Upsample2D` join:
  their 3x3 convs get rank `conv_dim`, their Linear/1x1 layers (time_emb_proj, conv_shortcut)
  rank `dim`;
- a layer at diffusers path `a.b.0.c` is saved as `lora_unet_a_b_0_c.lora_down.weight`,
  `.lora_up.weight` and `.alpha`; the update is `W + (alpha / rank) * up @ down`, which is peft's
  `lora_alpha / r` scaling, so peft's lora_A/lora_B are kohya's down/up unchanged.

kohya files made elsewhere load the same way, layer by layer with their own rank and alpha
(`load_kohya_lora`). diffusers' `load_lora_weights` reads them too, but (0.42.1) gives attention
layers the file's most common alpha instead of their own, and under transformers 5 loads the
text-encoder layers partly or with the wrong alpha.

SDXL is the exception in naming: kohya trains SDXL LoRAs on Stability's original UNet, so its
names follow that layout (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
`lora_unet_middle_block_1_...`, `lora_unet_output_blocks_2_2_conv`), which A1111 and ComfyUI
expect and diffusers maps back. `module_names` gives those names from the single-file key map
(`library.models.ldm_keys.unet_key_map`), so the layers chosen are the same, only named as kohya does.
SDXL text-encoder layers are `lora_te1_*` (CLIP-L) and `lora_te2_*` (bigG).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError
from library.tensor_files import read_safetensors, safetensors_errors, safetensors_keys, write_safetensors

PREFIX_UNET = "lora_unet"
PREFIX_TEXT_ENCODER = "lora_te"
ADAPTER = "default"
ATTENTION_BLOCKS = ("Transformer2DModel",)  # kohya's UNET_TARGET_REPLACE_MODULE
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
NETWORK_MODULE = "networks.lora"  # what kohya writes as ss_network_module


@dataclass(frozen=True)
class LoraShape:
    """The trainer's LoRA settings: rank and alpha, and those of the 3x3 convs (0 = none)."""

    dim: int
    alpha: float
    conv_dim: int = 0
    conv_alpha: float = 1.0


@dataclass(frozen=True)
class LoraTarget:
    module: str  # diffusers module path, e.g. down_blocks.0.attentions.0.proj_in
    rank: int
    alpha: float


def kohya_name(module_path: str, prefix: str = PREFIX_UNET) -> str:
    return f"{prefix}_{module_path.replace('.', '_')}"


def _layer_paths(root: torch.nn.Module) -> list[str]:
    """Module paths of every Linear/Conv2d, as the plain model names them (peft's wrappers removed)."""
    return [path.removesuffix(".base_layer") for path, module in root.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in path]


def module_names(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers module path -> kohya layer name of every LoRA-able UNet layer (SGM names for SDXL,
    whose family says kohya names its layers by the original checkpoint keys)."""
    from library.models.families import family_of_unet

    paths = _layer_paths(unet)
    if not family_of_unet(unet).lora_names_from_original_keys:
        return {path: kohya_name(path) for path in paths}
    from library.models.ldm_keys import unet_key_map

    ldm = unet_key_map([f"{path}.weight" for path in paths])
    return {path: kohya_name(ldm[f"{path}.weight"].removesuffix(".weight")) for path in paths}


def _is_pointwise(module: torch.nn.Module) -> bool:
    """Linear or 1x1 conv: the layers that take the main rank."""
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def lora_targets(unet: torch.nn.Module, shape: LoraShape) -> list[LoraTarget]:
    """The layers kohya's LoRA would train on this UNet, with their ranks and alphas."""
    blocks = ATTENTION_BLOCKS + (CONV_BLOCKS if shape.conv_dim > 0 else ())
    targets: dict[str, LoraTarget] = {}
    for block_name, block in unet.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for child_name, child in block.named_modules():
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            path = f"{block_name}.{child_name}"
            if _is_pointwise(child):
                targets[path] = LoraTarget(path, shape.dim, shape.alpha)
            elif shape.conv_dim > 0:
                targets[path] = LoraTarget(path, shape.conv_dim, shape.conv_alpha)
    return list(targets.values())


def layer_names(root: torch.nn.Module, prefix: str) -> dict[str, str]:
    """kohya name -> module path, for every Linear/Conv2d a LoRA file could address. A layer that
    already carries a peft LoRA (an earlier file) keeps its own name; peft's adapter layers are
    not addressable."""
    if prefix == PREFIX_UNET:
        return {name: path for path, name in module_names(root).items()}
    return {kohya_name(path, prefix): path for path in _layer_paths(root)}


def text_encoder_layer_names(text_encoder: torch.nn.Module, prefix: str = PREFIX_TEXT_ENCODER) -> dict[str, str]:
    """kohya name -> module path in the CLIP text encoder. kohya names layers by transformers 4's
    paths (`text_model.encoder.layers...`); transformers 5's CLIPTextModel has no `text_model` level."""
    names = {}
    for name, path in layer_names(text_encoder, prefix).items():
        if not path.startswith("text_model."):
            name = kohya_name(f"text_model.{path}", prefix)
        names[name] = path
    return names


# -- injection ------------------------------------------------------------------------------


def inject(root: torch.nn.Module, targets: list[LoraTarget], adapter_name: str) -> None:
    """Put a peft LoRA adapter on exactly these layers, each with its own rank and alpha
    (lora_A initialised as kohya's lora_down, lora_B = up at zero). peft freezes the rest."""
    from peft import LoraConfig, inject_adapter_in_model

    rank, alpha = Counter((t.rank, t.alpha) for t in targets).most_common(1)[0][0]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=[t.module for t in targets],
        # Exact paths: peft reads pattern keys as regexes matched at the end of a module path.
        rank_pattern={re.escape(t.module): t.rank for t in targets if t.rank != rank},
        alpha_pattern={re.escape(t.module): t.alpha for t in targets if t.alpha != alpha},
    )
    inject_adapter_in_model(config, root, adapter_name)


def add_lora(unet: torch.nn.Module, targets: list[LoraTarget], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Trainable LoRA layers on a frozen UNet; returns the LoRA parameters, in `dtype`."""
    if not targets:
        raise UserError("this UNet has no layers kohya's LoRA would train (no Transformer2DModel blocks)")
    unet.requires_grad_(False)
    inject(unet, targets, ADAPTER)
    params = []
    for layer in _lora_layers(unet).values():
        # peft creates the adapter in the base layer's dtype; LoRA trains in fp32 unless --full_bf16.
        for part in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            part.to(dtype=dtype)
            part.requires_grad_(True)
            params.extend(part.parameters())
    return params


def _lora_layers(root: torch.nn.Module, adapter_name: str = ADAPTER) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {path: m for path, m in root.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


def lora_state_dict(unet: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The injected LoRA as kohya tensors: lora_down/lora_up weights and alpha per layer."""
    tensors: dict[str, torch.Tensor] = {}
    names = module_names(unet)
    for path, layer in _lora_layers(unet).items():
        name = names[path]
        tensors[f"{name}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER])).to(dtype)
    if not tensors:
        raise ValueError("the UNet carries no LoRA adapter")
    return tensors


def lora_metadata(unet: torch.nn.Module) -> dict[str, str]:
    """kohya's `ss_network_*` keys; conv ranks go to ss_network_args as kohya writes them."""
    layers = _lora_layers(unet)
    pointwise = [(l.r[ADAPTER], l.lora_alpha[ADAPTER]) for l in layers.values() if _is_pointwise(l.get_base_layer())]
    conv = [(l.r[ADAPTER], l.lora_alpha[ADAPTER]) for l in layers.values() if not _is_pointwise(l.get_base_layer())]
    dim, alpha = Counter(pointwise).most_common(1)[0][0] if pointwise else (0, 0.0)
    meta = {"ss_network_module": NETWORK_MODULE, "ss_network_dim": str(dim), "ss_network_alpha": str(float(alpha))}
    if conv:
        conv_dim, conv_alpha = Counter(conv).most_common(1)[0][0]
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_alpha))})
    return meta


def save_lora(path: Path, unet: torch.nn.Module, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
    """Write NAME-lora.safetensors (kohya layout, ss_* metadata and sshs hashes), atomically."""
    return write_safetensors(path, lora_state_dict(unet, dtype), {**metadata, **lora_metadata(unet)}, hashes=True)


# -- reading kohya files ---------------------------------------------------------------------

PLAIN_LORA_PARTS = {"lora_down.weight", "lora_up.weight", "alpha"}


def _read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    try:
        return read_safetensors(path)[0]
    except safetensors_errors() as e:
        raise UserError(f"{path}: not a readable safetensors LoRA file ({e})") from None


def is_kohya_file(path: str | Path) -> bool:
    """A safetensors file whose keys are kohya's (lora_unet_*, lora_te_*), not diffusers/peft's."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        return False
    try:
        keys = safetensors_keys(path)
    except safetensors_errors() as e:
        raise UserError(f"{path}: not a readable safetensors LoRA file ({e})") from None
    return any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys)


def _group(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya layer name: {"lora_down.weight": ..., "lora_up.weight": ..., "alpha": ...}}"""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        layers.setdefault(name, {})[part] = value
    return layers


def _check_layer(path: str | Path, name: str, parts: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    if not {"lora_down.weight", "lora_up.weight"} <= parts.keys() or not parts.keys() <= PLAIN_LORA_PARTS:
        raise UserError(
            f"{path}: {name} has the tensors {', '.join(sorted(parts))}; only plain LoRA "
            "(lora_down.weight, lora_up.weight, alpha) is supported, not LoHa/LoKr/DoRA/Tucker variants"
        )
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if isinstance(module, torch.nn.Linear):
        fan_in, fan_out = module.in_features, module.out_features
    else:
        fan_in, fan_out = module.in_channels, module.out_channels
    if down.shape[1] != fan_in or up.shape[0] != fan_out or up.shape[1] != down.shape[0]:
        raise UserError(
            f"{path}: {name} does not fit this model (lora_down {tuple(down.shape)}, lora_up {tuple(up.shape)}; "
            f"the layer maps {fan_in} -> {fan_out}). Is this LoRA for another base model (SD1.x vs SD2.x vs SDXL)?"
        )


def _kohya_layers(
    path: str | Path, layers: dict[str, dict[str, torch.Tensor]], names: dict[str, str], root: torch.nn.Module
) -> tuple[list[LoraTarget], dict[str, dict[str, torch.Tensor]]]:
    """Checked targets (rank from the shapes, alpha from the file, or = rank when absent, as
    kohya) and the tensors keyed by module path, for the layers of one model part."""
    targets, weights = [], {}
    for name, parts in sorted(layers.items()):
        module_path = names[name]
        module = root.get_submodule(module_path)
        _check_layer(path, name, parts, getattr(module, "base_layer", module))  # unwrap an earlier file's LoRA
        rank = int(parts["lora_down.weight"].shape[0])
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        targets.append(LoraTarget(module_path, rank, alpha))
        weights[module_path] = parts
    return targets, weights


def _unknown_layers_error(path: str | Path, unknown: list[str], total: int) -> UserError:
    return UserError(
        f"{path}: {len(unknown)} of {total} LoRA layers match no layer of this model "
        f"(e.g. {', '.join(sorted(unknown)[:3])}). Is this LoRA for another base model (SD1.x vs SD2.x vs SDXL)?"
    )


def load_lora_weights_into(root: torch.nn.Module, weights: dict[str, dict[str, torch.Tensor]], adapter_name: str = ADAPTER) -> None:
    """Copy kohya down/up tensors into injected peft layers."""
    layers = _lora_layers(root, adapter_name)
    with torch.no_grad():
        for module_path, parts in weights.items():
            layer = layers[module_path]
            for part, key in ((layer.lora_A[adapter_name], "lora_down.weight"), (layer.lora_B[adapter_name], "lora_up.weight")):
                part.weight.copy_(parts[key].reshape(part.weight.shape))


def load_kohya_lora(path: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module, adapter_name: str,
                    text_encoder_2: torch.nn.Module | None = None) -> None:
    """A kohya LoRA file (UNet and text encoder layers) as peft adapter `adapter_name`, with
    every layer's own rank and alpha. Unknown layers and wrong shapes fail naming the file.
    With `text_encoder_2` (SDXL) the text layers are kohya's `lora_te1_*` and `lora_te2_*`."""
    layers = _group(_read_tensors(path))
    parts = [(PREFIX_UNET, unet, layer_names(unet, PREFIX_UNET))]
    if text_encoder_2 is None:
        parts.append((PREFIX_TEXT_ENCODER, text_encoder, text_encoder_layer_names(text_encoder)))
    else:
        parts += [(f"{PREFIX_TEXT_ENCODER}1", text_encoder, text_encoder_layer_names(text_encoder, f"{PREFIX_TEXT_ENCODER}1")),
                  (f"{PREFIX_TEXT_ENCODER}2", text_encoder_2, text_encoder_layer_names(text_encoder_2, f"{PREFIX_TEXT_ENCODER}2"))]
    unknown = [name for name in layers if not any(name in names for _, _, names in parts)]
    if unknown:
        raise _unknown_layers_error(path, unknown, len(layers))
    checked = []  # every layer is checked before any is injected
    for _, root, names in parts:
        mine = {name: value for name, value in layers.items() if name in names}
        if mine:
            checked.append((root, *_kohya_layers(path, mine, names, root)))
    for root, targets, weights in checked:
        inject(root, targets, adapter_name)
        load_lora_weights_into(root, weights, adapter_name)


def set_multipliers(roots: list[torch.nn.Module], multipliers: dict[str, float]) -> None:
    """Activate these adapters together, each scaled by its multiplier (`--network_mul`):
    the layer computes W x + sum_i mul_i * alpha_i / rank_i * up_i down_i x."""
    from peft.tuners.lora import LoraLayer

    for root in roots:
        for layer in root.modules():
            if isinstance(layer, LoraLayer):
                present = [name for name in multipliers if name in layer.lora_A]
                layer.set_adapter(present, inference_mode=True)
                for name in present:
                    layer.set_scale(name, multipliers[name])


def targets_from_file(path: str | Path, unet: torch.nn.Module) -> tuple[list[LoraTarget], dict[str, dict[str, torch.Tensor]]]:
    """The layers, ranks, alphas and tensors of a kohya UNet LoRA, to continue training it."""
    layers = _group(_read_tensors(path))
    names = layer_names(unet, PREFIX_UNET)
    others = sorted(n for n in layers if not n.startswith(PREFIX_UNET + "_"))
    if not layers or others:
        raise UserError(f"{path}: not a kohya UNet LoRA (keys such as {', '.join(others[:3]) or 'none'}); "
                        "train_pfg.py continues only UNet LoRAs (lora_unet_* keys)")
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise _unknown_layers_error(path, unknown, len(layers))
    return _kohya_layers(path, layers, names, unet)


def add_unet_lora(unet: torch.nn.Module, shape: LoraShape, dtype: torch.dtype, weights_file: str = "") -> list[torch.nn.Parameter]:
    """The trainer's entry: a fresh LoRA of `shape`, or the one in `weights_file` continued
    (its own ranks and alphas win over `shape`)."""
    if not weights_file:
        return add_lora(unet, lora_targets(unet, shape), dtype)
    targets, weights = targets_from_file(weights_file, unet)
    found = sorted({(t.rank, t.alpha) for t in targets})
    if not set(found) <= {(shape.dim, shape.alpha), (shape.conv_dim, shape.conv_alpha)}:
        print(f"--network_weights {weights_file}: continuing with the file's (rank, alpha) {found}, not the flags'")
    params = add_lora(unet, targets, dtype)
    load_lora_weights_into(unet, weights)
    return params


# -- applying LoRA files to a model for generation ----------------------------------------


def apply_lora_files(model, files: list[str], multipliers: list[float]) -> None:
    """Load LoRA files onto the UNet and text encoder, mixed with their multipliers.

    kohya-format files (`lora_unet_*`/`lora_te_*`, ours or made elsewhere) go through
    `library.models.lora`, which keeps every layer's alpha and checks the file against the model;
    diffusers/peft-format files go through diffusers' `load_lora_weights`.
    """
    if not files:
        return
    names = [f"lora{index}" for index in range(len(files))]
    for name, file in zip(names, files):
        if is_kohya_file(file):
            load_kohya_lora(file, model.unet, model.text_encoder, name, model.text_encoder_2)
        else:
            _load_diffusers_lora(model, file, name)
    roots = [m for m in (model.unet, model.text_encoder, model.text_encoder_2) if m is not None]
    set_multipliers(roots, dict(zip(names, multipliers or [1.0] * len(names))))


def _load_diffusers_lora(model, file: str, name: str) -> None:
    pipe = model.family.pipeline(model, scheduler=None, img2img=False)  # diffusers' LoRA loader lives on pipelines
    try:
        pipe.load_lora_weights(file, adapter_name=name)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise UserError(f"{file}: cannot load as a LoRA for this model ({type(e).__name__}: {e})") from None
