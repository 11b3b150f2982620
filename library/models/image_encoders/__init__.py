"""Image encoders: an image becomes the pooled vector PFG is conditioned on.

Two families share one interface (`ImageEncoder`): WD taggers in ONNX (`wd_tagger.py`, the
default: the pooled pre-classifier vector) and CLIP vision models through transformers
(`clip.py`: the projected image embedding), so PFG is not tied to anime taggers.
`load_encoder` picks the family from what the user names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from library.errors import UserError


@runtime_checkable
class ImageEncoder(Protocol):
    encoder_id: str  # file name + short content hash; stored in every cache and PFG file
    dim: int
    item_shape: tuple[int, ...]  # shape of one preprocessed image (float32)

    def preprocess(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """One image -> model input without the batch axis (written into `out` when given, e.g. a
        row of a batch buffer). CPU only, safe to call from threads."""

    def encode_batch(self, batch: np.ndarray) -> np.ndarray:
        """Stacked preprocess() outputs -> float32 (B, dim)."""

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """Convenience: preprocess and encode a list of images -> float32 (B, dim)."""


def detect_encoder_kind(spec: str) -> str:
    """"wd" for an .onnx file or a folder holding one, "clip" for a transformers folder (config.json);
    a hub id cannot be inspected offline and counts as "wd" unless --encoder clip says otherwise."""
    path = Path(spec).expanduser()
    if path.is_dir() and not any(path.glob("*.onnx")) and (path / "config.json").is_file():
        return "clip"
    return "wd"


ENCODER_KINDS = ("auto", "wd", "clip")


def load_encoder(spec: str, device: str = "cpu", feature_tensor: str | None = None, kind: str = "auto") -> ImageEncoder:
    """Load an image encoder: a WD tagger folder, bare .onnx or hub id ("wd"), or a CLIP vision
    folder or hub id ("clip"); "auto" tells them apart by the files (hub ids: "wd")."""
    spec = str(spec)
    if kind not in ENCODER_KINDS:
        raise UserError(f"unknown encoder kind {kind!r}; choose from {', '.join(ENCODER_KINDS)}")
    if kind == "auto":
        kind = detect_encoder_kind(spec)
    if kind == "clip":
        if feature_tensor:
            raise UserError("--feature_tensor applies to ONNX taggers, not to a CLIP vision model")
        from library.models.image_encoders.clip import ClipVisionEncoder, resolve_clip

        folder, name = resolve_clip(spec)
        return ClipVisionEncoder(folder, name, device=device)
    from library.models.image_encoders.wd_tagger import OnnxTagger, resolve_tagger

    return OnnxTagger(resolve_tagger(spec), device=device, feature_tensor=feature_tensor)
