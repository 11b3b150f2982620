"""Reading tensor files users hand us: safetensors, and pickles loaded weights-only. Damaged,
truncated or foreign files raise the library's own errors, listed here, so callers turn exactly
those into a message naming the file and let any other exception show as the bug it is."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch


def safetensors_errors() -> tuple[type[BaseException], ...]:
    """What safe_open raises for a file that is not a readable safetensors file: the library's
    SafetensorError (bad or truncated header) and OSError (missing, a folder, unreadable)."""
    from safetensors import SafetensorError

    return (SafetensorError, OSError)


# torch.load(weights_only=True) on a damaged, truncated or code-carrying pickle: the pickle
# refused (UnpicklingError), a broken zip (RuntimeError), junk bytes (KeyError, ValueError),
# an empty file (EOFError), a missing or unreadable one (OSError).
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, KeyError, ValueError, EOFError, OSError)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor (on the CPU) and the string metadata of a safetensors file; raises
    `safetensors_errors()` for files that are not readable safetensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file, without reading the tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return list(f.keys())
