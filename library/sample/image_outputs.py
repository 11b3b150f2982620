"""Generated images on disk: PNGs with A1111's `parameters` text chunk, and contact sheets."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from library.fileio import atomic_path

_NAME = re.compile(r"^(\d{5})-")


def next_index(outdir: Path) -> int:
    """The first free index: a rerun into the same folder never overwrites earlier images."""
    indices = [int(m.group(1)) for p in Path(outdir).glob("*.png") if (m := _NAME.match(p.name))]
    return max(indices, default=-1) + 1


def save_png(image: Image.Image, path: Path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_parameters(path: Path) -> str:
    with Image.open(path) as im:
        return im.text.get("parameters", "")


def contact_sheet(rows: list[tuple[Image.Image | None, list[Image.Image]]], cell: int = 192, label_rows: list[str] | None = None) -> Image.Image:
    """One row per guide: the guide image (or an empty cell), then its results, each fitted into a
    square cell."""
    columns = 1 + max((len(results) for _, results in rows), default=0)
    sheet = Image.new("RGB", (columns * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (guide, results) in enumerate(rows):
        for c, image in enumerate([guide, *results]):
            if image is None:
                continue
            thumb = image.convert("RGB").copy()
            thumb.thumbnail((cell - 4, cell - 4))
            sheet.paste(thumb, (c * cell + (cell - thumb.width) // 2, r * cell + (cell - thumb.height) // 2))
        if label_rows:
            draw.text((4, r * cell + 2), label_rows[r], fill=(0, 0, 0))
        draw.line([(cell - 1, r * cell), (cell - 1, (r + 1) * cell)], fill=(128, 128, 128))
    return sheet
