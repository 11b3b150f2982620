"""Tensor files: reading the ones users hand us (safetensors, and pickles loaded weights-only),
and writing ours in bounded memory.

Damaged, truncated or foreign files raise the library's own errors, listed here, so callers turn
exactly those into a message naming the file and let any other exception show as the bug it is.

Writing streams: `write_safetensors` puts the header down, then each tensor's bytes straight
from its memory (cast to the save dtype and copied off the GPU one tensor at a time), hashing
them on the way for kohya's `sshs_*` keys. Nothing holds a second copy of the weights, which is
what used to run a 24 GB host out of memory while saving an SDXL checkpoint. The files hold what
`safetensors.torch.save_file` writes for the same tensors and metadata, in the same places.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Mapping, NamedTuple

import torch

from library.fileio import atomic_path


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


# ---------------------------------------------------------------------------------- writing

# safetensors' dtype names, in the library's own order: its files hold the largest first (in
# this list's reverse), then by tensor name. Keeping its order keeps its bytes, and its hashes.
SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
    torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}
_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}


class _Entry(NamedTuple):
    name: str
    dtype: torch.dtype  # as saved
    shape: tuple[int, ...]
    nbytes: int


def _plan(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> list[_Entry]:
    """The tensors in file order, with the dtype each is saved in (`dtype` for floating ones)."""
    entries = []
    for name, tensor in tensors.items():
        saved = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if saved not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: safetensors has no dtype {saved}")
        entries.append(_Entry(name, saved, tuple(tensor.shape), tensor.numel() * saved.itemsize))
    return sorted(entries, key=lambda e: (-_RANK[e.dtype], e.name))


def _header(entries: list[_Entry], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and the JSON header, as safetensors writes them: compact JSON padded with
    spaces to a multiple of 8 bytes (safetensors orders the metadata keys as its hash map happens
    to; here they keep their order, which changes no length, offset or hash)."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _tensor_bytes(tensor: torch.Tensor, dtype: torch.dtype) -> memoryview:
    """The tensor's bytes as saved: a view of its memory, or of one cast/CPU copy of it alone."""
    saved = tensor.detach().to("cpu", dtype).contiguous()
    return memoryview(saved.reshape(-1).view(torch.uint8).numpy())


def _stream(entries: list[_Entry], tensors: Mapping[str, torch.Tensor], sink, hashes) -> None:
    for entry in entries:
        data = _tensor_bytes(tensors[entry.name], entry.dtype)
        if hashes is not None:
            hashes.update(data)
        if sink is not None:
            sink(data)
        del data  # before the next one is made: one tensor's copy at a time


def safetensors_hashes_of(tensors: Mapping[str, torch.Tensor], hash_metadata: Mapping[str, str],
                          dtype: torch.dtype | None = None) -> dict[str, str]:
    """The sshs hashes of `tensors` saved with `hash_metadata`, one tensor in memory at a time."""
    from library.metadata import SshsHashes

    entries = _plan(tensors, dtype)
    hashes = SshsHashes(_header(entries, hash_metadata))
    _stream(entries, tensors, None, hashes)
    return hashes.values()


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      dtype: torch.dtype | None = None, hashes: bool = False) -> Path:
    """Write `tensors` (floating ones cast to `dtype` when given) as a safetensors file, atomically
    and in bounded memory. With `hashes`, the metadata also gets kohya's `sshs_model_hash` and
    `sshs_legacy_hash`: the header goes down with placeholders of their fixed length and is
    rewritten once the data, hashed as it was written, is complete."""
    from library.metadata import SshsHashes, training_keys

    path = Path(path)
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    entries = _plan(tensors, dtype)
    hasher = SshsHashes(_header(entries, training_keys(metadata))) if hashes else None
    placeholders = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8} if hashes else {}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        header = _header(entries, {**metadata, **placeholders})
        f.write(header)
        _stream(entries, tensors, f.write, hasher)
        if hasher is not None:
            final = _header(entries, {**metadata, **hasher.values()})
            assert len(final) == len(header), "the hash placeholders keep the header's length"
            f.seek(0)
            f.write(final)
    return path
