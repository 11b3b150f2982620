"""WD tagger tags as kohya-style caption files (`<stem>.txt`: "tag, tag, ...").

The probabilities come from the same forward pass that produces the PFG vector. Like kohya's
tag_images_by_wd14_tagger.py: general tags above the general threshold, then character tags above
the character threshold, each in selected_tags.csv order; underscores become spaces except in
kaomoji-like tags (`^_^`), whose underscore is part of the face; rating tags only on request (the
most likely one, first).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from library.data.captions import caption_path
from library.errors import UserError
from library.fileio import atomic_path

# WD categories in selected_tags.csv
GENERAL, CHARACTER, RATING = 0, 4, 9

# The list kohya and the A1111 WD14 tagger extension keep verbatim.
KAOMOJIS = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
    "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})


@dataclass(frozen=True)
class TagList:
    names: tuple[str, ...]
    categories: np.ndarray  # int, one per tag, in the model's output order


def load_tag_list(path: str | os.PathLike) -> TagList:
    """selected_tags.csv (columns tag_id, name, category, count) -> TagList."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: --write_tags needs the tagger's selected_tags.csv beside model.onnx")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        names = tuple(row["name"] for row in rows)
        categories = np.array([int(row["category"]) for row in rows], dtype=np.int64)
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a WD selected_tags.csv with 'name' and 'category' columns ({type(e).__name__}: {e})") from None
    return TagList(names, categories)


def format_tag(name: str) -> str:
    return name if name in KAOMOJIS else name.replace("_", " ")


def select_tags(
    probs: np.ndarray, tags: TagList, general_threshold: float, character_threshold: float, include_rating: bool = False
) -> list[str]:
    """Tags of one image from its probability row, formatted for a caption."""
    probs = np.asarray(probs)
    general = [i for i in np.flatnonzero((tags.categories == GENERAL) & (probs >= general_threshold))]
    character = [i for i in np.flatnonzero((tags.categories == CHARACTER) & (probs >= character_threshold))]
    chosen = general + character
    ratings = np.flatnonzero(tags.categories == RATING)
    if include_rating and len(ratings):
        chosen.insert(0, ratings[np.argmax(probs[ratings])])
    return [format_tag(tags.names[i]) for i in chosen]


@dataclass(frozen=True)
class CaptionWriter:
    """Writes one caption file per image; existing files are kept unless `overwrite`."""

    tags: TagList
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    include_rating: bool = False
    extension: str = ".txt"
    overwrite: bool = False

    def path(self, image: Path) -> Path:
        return caption_path(image, self.extension)

    def wanted(self, image: Path) -> bool:
        """Whether this image's caption is still to be written."""
        return self.overwrite or not self.path(image).exists()

    def check_width(self, num_probs: int, model: str) -> None:
        if num_probs != len(self.tags.names):
            raise UserError(f"{model} outputs {num_probs} tag probabilities but selected_tags.csv lists {len(self.tags.names)} tags")

    def write(self, image: Path, probs: np.ndarray) -> bool:
        """Write the caption atomically; False when an existing file was kept."""
        if not self.wanted(image):
            return False
        text = ", ".join(select_tags(probs, self.tags, self.general_threshold, self.character_threshold, self.include_rating))
        with atomic_path(self.path(image)) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
        return True
