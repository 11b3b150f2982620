"""The UNet's attention backend: torch's scaled-dot-product attention (the default) or xformers."""
from __future__ import annotations

import torch

from library.errors import UserError


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
