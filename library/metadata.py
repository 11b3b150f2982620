"""Self-describing outputs: kohya-style `ss_*` training metadata, `modelspec.*`, and the
precomputed hashes webui extensions read (`sshs_model_hash`, `sshs_legacy_hash`).

`python -m library.metadata FILE` prints a safetensors file's metadata and tensor summary.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from library.errors import UserError, run_cli

MODELSPEC_VERSION = "1.0.0"


def modelspec(arch: str, v_prediction: bool, kind: str, title: str, resolution: tuple[int, int]) -> dict[str, str]:
    """`modelspec.*` keys (Stability's model spec) for a model of architecture `arch` (its family's
    modelspec_architecture). `kind` is the adapter suffix: "pfg", "lora" or ""."""
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{arch}/{kind}" if kind else arch,
        "modelspec.implementation": "diffusers" if kind == "lora" else "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }


def training_metadata(values: dict[str, object]) -> dict[str, str]:
    """`ss_*` keys: every value as a string (JSON for structures), as kohya writes them."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
        out[key if key.startswith("ss_") else f"ss_{key}"] = text
    return out


LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000  # the legacy hash reads 64 KiB at 1 MiB


class SshsHashes:
    """kohya's precomputed `sshs_model_hash` and `sshs_legacy_hash` (what webui extensions would
    compute from the file), taken while a safetensors file's bytes stream past, so no copy of the
    tensors is ever made to hash them.

    kohya hashes the file as it would be with only the immutable `ss_*` keys in its metadata (so
    later edits of user metadata keep the hash): `header` is that file's header, its 8-byte length
    included. model hash: sha256 of the bytes after the header (the tensor data, the same in the
    real file); legacy: sha256 of the 64 KiB at offset 1 MiB of that file, first 8 hex digits.
    """

    def __init__(self, header: bytes):
        self._model = hashlib.sha256()
        self._legacy = hashlib.sha256()
        self._position = 0  # in the ss_*-only file
        self._legacy_update(memoryview(header))

    def _legacy_update(self, data: memoryview) -> None:
        start, end = self._position, self._position + len(data)
        low, high = max(start, LEGACY_OFFSET), min(end, LEGACY_OFFSET + LEGACY_LENGTH)
        if low < high:
            self._legacy.update(data[low - start : high - start])
        self._position = end

    def update(self, data: memoryview) -> None:
        """The next tensor bytes (in file order)."""
        self._model.update(data)
        self._legacy_update(data)

    def values(self) -> dict[str, str]:
        return {"sshs_model_hash": self._model.hexdigest(), "sshs_legacy_hash": self._legacy.hexdigest()[:8]}


def training_keys(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata the sshs hashes cover: the `ss_*` training keys."""
    return {k: v for k, v in metadata.items() if k.startswith("ss_")}


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of `tensors` saved with `metadata`, computed from the
    tensors one at a time (library.tensor_files.write_safetensors stores them in its files)."""
    from library.tensor_files import safetensors_hashes_of

    hashes = safetensors_hashes_of(tensors, training_keys(metadata))
    return hashes["sshs_model_hash"], hashes["sshs_legacy_hash"]


def read_metadata(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """(metadata, {tensor name: (shape, dtype)}) without loading tensor data."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    from library.tensor_files import safetensors_errors

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except safetensors_errors() as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    return meta, tensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a safetensors file's metadata and tensor summary.")
    parser.add_argument("file")
    parser.add_argument("--tensors", action="store_true", help="list every tensor, not just a summary")
    args = parser.parse_args(argv)
    meta, tensors = read_metadata(args.file)
    print(f"# {args.file}")
    print(f"## metadata ({len(meta)} keys)")
    for key in sorted(meta):
        value = meta[key]
        print(f"{key}: {value if len(value) < 200 else value[:200] + '...'}")
    params = sum(int(torch.tensor(shape).prod()) if shape else 1 for shape, _ in tensors.values())
    dtypes = sorted({dtype for _, dtype in tensors.values()})
    print(f"## tensors: {len(tensors)}, {params:,} values, dtypes {', '.join(dtypes)}")
    names = sorted(tensors) if args.tensors else sorted(tensors)[:10]
    for name in names:
        shape, dtype = tensors[name]
        print(f"{name}: {list(shape)} {dtype}")
    if len(names) < len(tensors):
        print(f"... {len(tensors) - len(names)} more (use --tensors)")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
