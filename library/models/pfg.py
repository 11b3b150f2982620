"""The PFG adapter: image vector -> extra cross-attention tokens, and its file formats.

`NAME-pfg.safetensors` holds `pfg_linear.weight` (N*C, D) and `pfg_linear.bias` (N*C); token i
is rows i*C ... (i+1)*C. This is the layout the original PFG scripts and the A1111/ComfyUI
loaders use, so files move between tools unchanged. The MLP variant (`--pfg_hidden_dim > 0`)
stores `pfg_mlp.0.*` and `pfg_mlp.2.*` instead and says so in the metadata (`pfg.head`).

SDXL's `--pfg_pooled` adds `pfg_pooled.weight` (P, D) and `pfg_pooled.bias` (P): a Linear whose
output, times pfg_scale, is added to the pooled text embedding the UNet takes beside the tokens
(`text_embeds`). It starts at zero, so training begins from the base model's pooled conditioning;
the metadata says `pfg.pooled` = P (0 when absent). Loaders that know only the tokens ignore it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError
from library.fileio import atomic_path
from library.tensor_files import TORCH_LOAD_ERRORS, read_safetensors, safetensors_errors, write_safetensors


@dataclass(frozen=True)
class PFGShape:
    num_tokens: int  # N
    input_dim: int  # D: the image encoder's vector width
    cross_attention_dim: int  # C: the UNet's context width
    hidden_dim: int = 0  # 0: the original single Linear; >0: Linear -> GELU -> Linear
    pooled_dim: int = 0  # SDXL --pfg_pooled: width P of the vector added to the pooled text embedding


class PFGAdapter(torch.nn.Module):
    """Maps (B, D) image vectors to (B, N, C) tokens: `pfg_scale * head(feature)`."""

    def __init__(self, shape: PFGShape):
        super().__init__()
        self.shape = shape
        out = shape.num_tokens * shape.cross_attention_dim
        if shape.hidden_dim > 0:
            self.pfg_mlp = torch.nn.Sequential(
                torch.nn.Linear(shape.input_dim, shape.hidden_dim),
                torch.nn.GELU(),
                torch.nn.Linear(shape.hidden_dim, out),
            )
        else:
            self.pfg_linear = torch.nn.Linear(shape.input_dim, out)
        if shape.pooled_dim > 0:
            self.pfg_pooled = torch.nn.Linear(shape.input_dim, shape.pooled_dim)
            torch.nn.init.zeros_(self.pfg_pooled.weight)
            torch.nn.init.zeros_(self.pfg_pooled.bias)

    def forward(self, features: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        head = self.pfg_mlp if self.shape.hidden_dim > 0 else self.pfg_linear
        param = next(head.parameters())
        tokens = head(features.to(device=param.device, dtype=param.dtype))
        tokens = tokens.reshape(-1, self.shape.num_tokens, self.shape.cross_attention_dim)
        if isinstance(scale, torch.Tensor):  # per-sample scale, e.g. PFG dropout
            scale = scale.to(tokens).reshape(-1, 1, 1)
        return tokens * scale

    def pooled(self, features: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor | None:
        """(B, P) addition to SDXL's pooled text embedding, or None without `--pfg_pooled`."""
        if self.shape.pooled_dim <= 0:
            return None
        param = self.pfg_pooled.weight
        vector = self.pfg_pooled(features.to(device=param.device, dtype=param.dtype))
        if isinstance(scale, torch.Tensor):
            scale = scale.to(vector).reshape(-1, 1)
        return vector * scale


def append_tokens(text_states: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The UNet context: text encoder states followed by the PFG tokens (the conditioning rule)."""
    if tokens is None:
        return text_states
    return torch.cat([text_states, tokens.to(text_states)], dim=1)


def uncond_tokens(mode: str, text_states: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Padding for the unconditional CFG branch (DESIGN.md §4).

    `zeros`: zero tokens, the convention of the existing loaders. `eos`: the last text
    token's state repeated, as the original script did. Same length as the conditional branch.
    """
    batch, _, width = text_states.shape
    if mode == "zeros":
        return text_states.new_zeros(batch, num_tokens, width)
    if mode == "eos":
        return text_states[:, -1:, :].expand(batch, num_tokens, width).clone()
    raise UserError(f"--uncond must be 'zeros' or 'eos', got {mode!r}")


def combine_features(features: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Several guide images: the weighted mean of their vectors, Σ w_i f_i / Σ w_i.

    Combining vectors (not tokens) keeps the result inside the encoder's space, which is what
    the adapter was trained on; with weights 1:0 it is exactly the first image. A total weight
    of zero is refused rather than silently dividing by zero.
    """
    if len(features) != len(weights) or not features:
        raise ValueError("one weight per guide image is required")
    total = float(sum(weights))
    if abs(total) < 1e-12:
        raise UserError(f"guide image weights {weights} sum to zero; give at least one non-zero weight")
    stacked = torch.stack([f.float() for f in features])
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * (stacked.dim() - 1)))
    return (stacked * w).sum(0) / total


# ---------------------------------------------------------------------------------------------
# Files


def _shape_from_state_dict(state: dict[str, torch.Tensor], where: str, metadata: dict[str, str],
                           cross_attention_dim: int | None) -> PFGShape:
    if "pfg_linear.weight" in state:
        weight = state["pfg_linear.weight"]
        hidden = 0
    elif "pfg_mlp.0.weight" in state and "pfg_mlp.2.weight" in state:
        hidden = state["pfg_mlp.0.weight"].shape[0]
        weight = state["pfg_mlp.2.weight"]
    else:
        raise UserError(f"{where}: not a PFG file (no 'pfg_linear.weight'; keys: {sorted(state)[:6]})")
    out_dim = weight.shape[0]
    num_tokens = _num_tokens(where, out_dim, metadata, cross_attention_dim)
    input_dim = state["pfg_mlp.0.weight"].shape[1] if hidden else weight.shape[1]
    if out_dim % num_tokens:
        raise UserError(f"{where}: output width {out_dim} is not divisible by {num_tokens} tokens")
    pooled = int(state["pfg_pooled.weight"].shape[0]) if "pfg_pooled.weight" in state else 0
    return PFGShape(num_tokens, input_dim, out_dim // num_tokens, hidden, pooled)


# The cross-attention widths C of the model families, for messages and metadata-less files.
FAMILY_WIDTHS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def _width_name(width: int) -> str:
    return f"C={width} ({FAMILY_WIDTHS[width]})" if width in FAMILY_WIDTHS else f"C={width}"


def _made_for_another_width(where: str, made: str, width: int, detail: str = "") -> UserError:
    return UserError(f"{where}: the PFG head was made for a model of {made}; this model's width is {_width_name(width)}"
                     f"{detail}: use the head with the model family it was trained for")


def _num_tokens(where: str, rows: int, metadata: dict[str, str], cross_attention_dim: int | None) -> int:
    """N: from the metadata (pfg.num_tokens, else rows / pfg.cross_attention_dim); for original
    `.pt` files, which carry none, rows / C of the model it is loaded for, else of the first
    model family's width that divides the rows."""
    if "pfg.num_tokens" in metadata:
        return int(metadata["pfg.num_tokens"])
    made_for = int(metadata.get("pfg.cross_attention_dim", 0))
    if made_for and rows % made_for == 0:
        return rows // made_for  # check_compatible then names both widths
    fits = [width for width in FAMILY_WIDTHS if rows % width == 0]
    if cross_attention_dim:
        if rows % cross_attention_dim == 0:
            return rows // cross_attention_dim
        made = "cross-attention width " + " or ".join(_width_name(w) for w in fits) if fits else "another cross-attention width"
        raise _made_for_another_width(where, made, cross_attention_dim,
                                      f" (its {rows} output rows are not a whole number of {cross_attention_dim}-wide tokens)")
    if fits:
        return rows // fits[0]
    raise UserError(
        f"{where}: its {rows} output rows are not a whole number of tokens of any model family's width "
        f"({', '.join(map(str, FAMILY_WIDTHS))}), and it has no pfg.num_tokens metadata"
    )


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept the original scripts' variants: a bare Linear state dict (`weight`, `bias`) or a
    wrapper such as `{"state_dict": ...}`."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if set(state) >= {"weight", "bias"} and "pfg_linear.weight" not in state:
        state = {"pfg_linear.weight": state["weight"], "pfg_linear.bias": state["bias"]}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_pfg(path: str | Path, cross_attention_dim: int | None = None) -> tuple[PFGAdapter, dict[str, str]]:
    """Load our safetensors or an original `.pt` PFG file. Returns the adapter and its metadata.

    `.pt` files are read with `weights_only=True`: no pickled code ever runs.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"PFG weights not found: {path}")
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            state, metadata = read_safetensors(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (*safetensors_errors(), *TORCH_LOAD_ERRORS) as e:  # corrupt file or a pickle with code in it
        raise UserError(f"{path}: cannot read PFG weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a PFG file (expected a dict of tensors, got {type(state).__name__})")
    state = _normalise_keys(state)
    shape = _shape_from_state_dict(state, str(path), metadata, cross_attention_dim)
    adapter = PFGAdapter(shape)
    try:
        adapter.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: tensors do not match a PFG head of shape {shape}: {e}") from None
    return adapter, metadata


def check_compatible(adapter: PFGAdapter, source: str, input_dim: int | None, cross_attention_dim: int | None) -> None:
    """Fail early, naming both numbers, when the PFG file does not fit the encoder or the UNet."""
    shape = adapter.shape
    if input_dim is not None and shape.input_dim != input_dim:
        raise UserError(
            f"{source}: PFG input width D={shape.input_dim} does not match the image encoder's vector width D={input_dim}"
        )
    if cross_attention_dim is not None and shape.cross_attention_dim != cross_attention_dim:
        raise _made_for_another_width(source, f"cross-attention width {_width_name(shape.cross_attention_dim)}", cross_attention_dim)


def pfg_metadata(shape: PFGShape, encoder_id: str) -> dict[str, str]:
    return {
        "pfg.num_tokens": str(shape.num_tokens),
        "pfg.input_dim": str(shape.input_dim),
        "pfg.cross_attention_dim": str(shape.cross_attention_dim),
        "pfg.head": "mlp" if shape.hidden_dim > 0 else "linear",
        "pfg.hidden_dim": str(shape.hidden_dim),
        "pfg.pooled": str(shape.pooled_dim),
        "pfg.encoder": encoder_id,
    }


def save_pfg(
    adapter: PFGAdapter,
    path: str | Path,
    metadata: dict[str, str],
    dtype: torch.dtype | None = None,
    save_pt: bool = False,
    hashes: bool = False,
) -> list[Path]:
    """Write `NAME-pfg.safetensors` in `dtype` (and `NAME-pfg.pt` when asked), atomically; `hashes`
    adds kohya's sshs_* keys.

    The `.pt` is always fp32 (it is small): the original pfg-webui and pfg-ComfyUI loaders feed it
    fp32 vectors and crash on half-precision weights (`addmv input tensors must have the same dtype`)."""
    path = Path(path)
    write_safetensors(path, adapter.state_dict(), metadata, dtype=dtype, hashes=hashes)
    written = [path]
    if save_pt:
        pt_path = path.with_suffix(".pt")
        with atomic_path(pt_path) as tmp:
            torch.save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.state_dict().items()}, tmp)
        written.append(pt_path)
    return written
