"""Generated images on disk: PNGs with A1111's `parameters` text chunk, and contact sheets."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
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


@dataclass(frozen=True)
class SheetRow:
    """One row of a contact sheet: a guide image (or None) and what was made from it, with the
    words that say what they are."""

    guide: Image.Image | None
    results: list[Image.Image]
    title: str = ""  # one line above the row, e.g. the prompt
    guide_label: str = ""  # under the guide, e.g. its file name
    result_labels: tuple[str, ...] = ()  # under each result, e.g. its seed


LINE = 14  # pixels per text line (Pillow's default font is 10 px high)


def contact_sheet(rows: list[SheetRow], cell: int = 192) -> Image.Image:
    """One row per guide: the guide image (or an empty cell), then its results, each fitted into a
    square cell; a title line above the row and a label line under each cell where given."""
    columns = 1 + max((len(row.results) for row in rows), default=0)
    title = LINE if any(row.title for row in rows) else 0
    labels = LINE if any(row.guide_label or row.result_labels for row in rows) else 0
    height = title + cell + labels
    sheet = Image.new("RGB", (columns * cell, len(rows) * height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        top = r * height
        if title:
            draw.text((4, top + 1), _fitted(draw, font, row.title, columns * cell - 8), fill=(0, 0, 0), font=font)
        texts = [row.guide_label, *row.result_labels]
        for c, image in enumerate([row.guide, *row.results]):
            if image is not None:
                thumb = image.convert("RGB").copy()
                thumb.thumbnail((cell - 4, cell - 4))
                sheet.paste(thumb, (c * cell + (cell - thumb.width) // 2, top + title + (cell - thumb.height) // 2))
            if labels and c < len(texts) and texts[c]:
                draw.text((c * cell + 4, top + title + cell), _fitted(draw, font, texts[c], cell - 8), fill=(0, 0, 0), font=font)
        draw.line([(cell - 1, top), (cell - 1, top + height - 1)], fill=(128, 128, 128))
        if r:
            draw.line([(0, top), (columns * cell - 1, top)], fill=(192, 192, 192))
    return sheet


def _fitted(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    """`text`, cut with an ellipsis where it would run past `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def grid_row(request, results: list[Image.Image], seeds: list[int]) -> SheetRow:
    """gen_pfg.py --grid: a request's first guide image (a vector file has no picture) beside its
    results, the prompt above, the guide names and the seeds below."""
    from library.data.images import load_image

    images = [g.path for g in request.guides if not g.path.endswith(".npz")]
    names = ", ".join(Path(g.path).name + (f":{g.weight:g}" if g.weight != 1 else "") for g in request.guides) or "no guide"
    prompt = request.prompt + (f" --n {request.negative_prompt}" if request.negative_prompt else "")
    return SheetRow(load_image(images[0]) if images else None, results, title=prompt, guide_label=names,
                    result_labels=tuple(f"seed {seed}" for seed in seeds))


def save_grid(rows: list[SheetRow], path: Path) -> Path:
    """The grid PNG; its text chunk repeats each row's labels, for tools that read text, not pixels."""
    described = [f"row {r}: {row.title} | {row.guide_label} | {', '.join(row.result_labels)}" for r, row in enumerate(rows, 1)]
    return save_png(contact_sheet(rows), path, "\n".join(["grid: each prompt's guide image, then its results", *described]))
