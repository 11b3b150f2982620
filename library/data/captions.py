"""Captions: which text goes with an image, and the per-step tag shuffle and dropout (kohya semantics)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from library.errors import UserError


class CaptionRng(Protocol):
    """random.Random and numpy.random.Generator both qualify."""

    def random(self) -> float: ...

    def shuffle(self, x: list) -> None: ...


def caption_path(image_path: str | os.PathLike, caption_extension: str) -> Path:
    """`dir/img.png` + `.txt` -> `dir/img.txt` (kohya replaces the image suffix)."""
    stem, _ = os.path.splitext(os.fspath(image_path))
    return Path(stem + caption_extension)


def read_caption_file(path: Path) -> str:
    """The first non-blank line, stripped ("" for an empty file); kohya reads only the first line."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: editors on Windows prepend a BOM
    except UnicodeDecodeError as e:
        raise UserError(
            f"caption file {path} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "re-save it as UTF-8"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read caption file {path}: {e.strerror or e}") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def resolve_caption(
    image_path: str | os.PathLike, caption_extension: str, class_tokens: str | None, pfg_prompt: str | None
) -> str:
    """The caption file beside the image if present, else the subset's class_tokens, else --pfg_prompt.

    With none of them the caption is "" (the image is conditioned by its PFG tokens alone).
    """
    path = caption_path(image_path, caption_extension)
    if path.is_file():
        return read_caption_file(path)
    if class_tokens:
        return class_tokens
    return pfg_prompt or ""


def process_caption(caption: str, shuffle: bool, keep_tokens: int, dropout_rate: float, rng: CaptionRng) -> str:
    """The caption as seen at one training step.

    Caption dropout first (returns "", the unconditional text, as kohya does); then, with
    `shuffle`, the comma-separated tags after the first `keep_tokens` are shuffled (the kept ones
    stay in front, in order). The rng is drawn from only for the features that are on, so a
    run without them keeps the same random stream.
    """
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    keep = max(0, keep_tokens)
    fixed, flexible = tags[:keep], tags[keep:]
    rng.shuffle(flexible)
    return ", ".join(fixed + flexible)
