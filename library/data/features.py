"""The PFG feature cache: one `<image stem>_pfg.npz` per image.

Keys: `feature` float32 (D,), `encoder` (id of the encoder that made it), `source_size` and
`source_mtime` of the image. A cache is only reused when all of them still match, so a changed
image or a different tagger is recomputed, never silently used.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from library.errors import UserError
from library.fileio import atomic_path

SUFFIX = "_pfg.npz"


def feature_cache_path(image_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """`<stem>_pfg.npz` beside the image, or inside cache_dir when one is given."""
    image_path = image_path if isinstance(image_path, Path) else Path(image_path)  # once per image per start
    folder = image_path.parent if cache_dir is None else cache_dir if isinstance(cache_dir, Path) else Path(cache_dir)
    return folder / f"{image_path.stem}{SUFFIX}"


def _source_stat(image_path: Path) -> tuple[int, float]:
    st = Path(image_path).stat()
    return int(st.st_size), float(st.st_mtime)


def save_feature(path: str | os.PathLike, feature: np.ndarray, encoder_id: str, image_path: str | os.PathLike) -> None:
    """Write one cache file atomically (temporary name, then rename)."""
    feature = np.asarray(feature, dtype=np.float32)
    if feature.ndim != 1:
        raise ValueError(f"feature must be a vector, got shape {feature.shape}")
    size, mtime = _source_stat(Path(image_path))
    with atomic_path(path) as tmp:
        np.savez(
            tmp,
            feature=feature,
            encoder=np.array(encoder_id),
            source_size=np.array(size, dtype=np.int64),
            source_mtime=np.array(mtime, dtype=np.float64),
        )


def load_valid_feature(path: str | os.PathLike, encoder_id: str, image_path: str | os.PathLike) -> np.ndarray | None:
    """The cached vector if the file exists, is readable and matches the encoder and the image
    as it is now; None otherwise (the caller recomputes rather than trusts it)."""
    if not Path(path).is_file():
        return None
    try:
        feature, cached_encoder, current = read_cache(path, image_path)
    except UserError:
        return None
    if cached_encoder != encoder_id or not current or not np.isfinite(feature).all():
        return None
    return feature


def read_feature(path: str | os.PathLike) -> np.ndarray:
    """The vector of a cache file, for training; a clear UserError when it cannot be used."""
    return read_cache(path)[0]


def read_cache(path: str | os.PathLike, image_path: str | os.PathLike | None = None) -> tuple[np.ndarray, str, bool]:
    """(vector, encoder id, whether it was made from `image_path` as it is now) in one read of the
    file; a clear UserError when the vector cannot be used. A cache without the image record
    (an older layout) or without an encoder id counts as not current, never as trusted."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"feature cache {path} is missing; run prepare_features.py first")
    try:
        with np.load(path, allow_pickle=False) as data:
            feature = data["feature"]
            names = set(data.files)
            encoder_id = str(data["encoder"]) if "encoder" in names else ""
            recorded = ((int(data["source_size"]), float(data["source_mtime"]))
                        if {"source_size", "source_mtime"} <= names else None)
    except KeyError:
        raise UserError(f"feature cache {path} has no 'feature' array; rerun prepare_features.py") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"feature cache {path} is unreadable ({e}); delete it and rerun prepare_features.py") from None
    if feature.ndim != 1:
        raise UserError(f"feature cache {path}: 'feature' has shape {feature.shape}, expected a vector")
    current = False
    if image_path is not None and recorded is not None and encoder_id:
        try:
            current = recorded == _source_stat(Path(image_path))
        except OSError:
            pass
    return feature.astype(np.float32, copy=False), encoder_id, current


def read_encoder_id(path: str | os.PathLike) -> str:
    """The encoder id stored in a cache file (training records it in the PFG metadata)."""
    encoder_id = read_cache(path)[1]
    if not encoder_id:
        raise UserError(f"feature cache {path} has no encoder id; rerun prepare_features.py")
    return encoder_id


class FeatureTable:
    """The PFG vectors of a list of items, row i for item i, without a private copy of them: each
    row lives in a block (a folder index's memory-mapped vectors, shared by the processes of a
    node, or vectors read since). Indexing with an int gives that vector as a tensor; with a list
    of positions, the table of those items."""

    def __init__(self, blocks: list[np.ndarray], block_of: np.ndarray, row_of: np.ndarray):
        self.blocks = blocks
        self.block_of = np.asarray(block_of, np.int32)
        self.row_of = np.asarray(row_of, np.int64)
        self.dim = int(blocks[0].shape[1]) if blocks else 0

    @classmethod
    def from_sources(cls, sources: list[tuple[np.ndarray, int]]) -> "FeatureTable":
        """One (block, row) per item."""
        blocks: list[np.ndarray] = []
        number: dict[int, int] = {}
        block_of, row_of = np.empty(len(sources), np.int32), np.empty(len(sources), np.int64)
        for i, (block, row) in enumerate(sources):
            if id(block) not in number:
                number[id(block)] = len(blocks)
                blocks.append(block)
            block_of[i], row_of[i] = number[id(block)], row
        return cls(blocks, block_of, row_of)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.row_of), self.dim)

    def __len__(self) -> int:
        return len(self.row_of)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return torch.from_numpy(np.array(self.blocks[self.block_of[key]][self.row_of[key]], dtype=np.float32))
        return FeatureTable(self.blocks, self.block_of[key], self.row_of[key])

    def tensor(self) -> torch.Tensor:
        """Every row in one (n, D) tensor (a copy: for small sets such as the held-out images)."""
        if not len(self):
            return torch.zeros((0, self.dim))
        return torch.from_numpy(np.stack([np.asarray(self.blocks[b][r], np.float32) for b, r in zip(self.block_of, self.row_of)]))
