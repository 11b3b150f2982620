"""Draw the demo dataset: synthetic "characters" an image encoder can tell apart.

Each character has its own body colour, body shape, accessory and a preferred placement, and is
drawn on varied backgrounds at varied sizes and aspect ratios (portrait, landscape, square; PNG
and JPEG). Every other image has a `.txt` caption; the rest fall back to the dataset's prompt.
`characters.json` records which image shows which character: the ground truth an evaluator needs.

    python -m tools.make_demo_dataset --out demo_output/data --seed 0

Layout of --out:  images/<name>_<k>.png|.jpg (+ .txt),  characters.json,  demo_kit.json (marker)
"""
from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from library.errors import UserError, run_cli
from library.fileio import atomic_dir

MARKER = "demo_kit.json"
KIT_VERSION = 1  # bump when the drawing changes, so stale folders are rebuilt
IMAGE_DIR = "images"
IMAGES_PER_CHARACTER = 6
SUPERSAMPLE = 4  # draw large, then downscale: smooth edges like real illustrations

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Character:
    name: str
    colour: str
    rgb: RGB
    shape: str
    accessory: str
    placement: str
    center: tuple[float, float]  # preferred body centre as a fraction of width and height

    @property
    def tags(self) -> list[str]:
        """Danbooru-style tags, so a tiny tagger can be fitted to them."""
        return [f"{self.colour}_body", self.shape, self.accessory, f"{self.placement}_placement"]


CHARACTERS = (
    Character("ruby", "red", (215, 35, 40), "circle", "hat", "left", (0.33, 0.56)),
    Character("cobalt", "blue", (35, 75, 215), "square", "scarf", "right", (0.67, 0.56)),
    Character("fern", "green", (35, 160, 55), "triangle", "bow", "top", (0.5, 0.4)),
    Character("sunny", "yellow", (240, 205, 25), "star", "glasses", "bottom", (0.5, 0.64)),
    Character("violet", "purple", (135, 45, 185), "diamond", "halo", "center", (0.5, 0.52)),
    Character("ember", "orange", (245, 125, 20), "hexagon", "antennae", "upper_right", (0.64, 0.42)),
)

# Portrait, landscape and square alternate, so any 6 consecutive sizes cover all three.
SIZES = ((96, 160), (256, 192), (128, 128), (160, 224), (160, 96), (192, 256), (192, 192), (224, 160))
BACKGROUNDS = ("simple", "gradient", "striped", "checkered")


def _muted(rng: random.Random) -> RGB:
    """A desaturated background colour, so the saturated body colour stays the identity cue."""
    grey = rng.randint(60, 235)
    return tuple(int(0.75 * grey + 0.25 * rng.randint(0, 255)) for _ in range(3))  # type: ignore[return-value]


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


def draw_background(kind: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    a, b = _muted(rng), _muted(rng)
    img = Image.new("RGB", size, a)
    d = ImageDraw.Draw(img)
    if kind == "gradient":
        vertical = rng.random() < 0.5
        n = h if vertical else w
        for i in range(n):
            c = _mix(a, b, i / max(n - 1, 1))
            d.line([(0, i), (w, i)] if vertical else [(i, 0), (i, h)], fill=c)
    elif kind == "striped":
        step = rng.randint(6, 16) * SUPERSAMPLE
        diagonal = rng.random() < 0.5
        for x in range(-h, w + h, 2 * step):
            if diagonal:
                d.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=b)
            else:
                d.rectangle([x, 0, x + step - 1, h], fill=b)
    elif kind == "checkered":
        step = rng.randint(10, 24) * SUPERSAMPLE
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=b)
    return img


def _regular_polygon(cx: float, cy: float, r: float, n: int, start_deg: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(math.radians(start_deg + 360 * i / n)), cy + r * math.sin(math.radians(start_deg + 360 * i / n)))
        for i in range(n)
    ]


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    outer = _regular_polygon(cx, cy, r, 5, -90)
    inner = _regular_polygon(cx, cy, r * 0.45, 5, -90 + 36)
    return [p for pair in zip(outer, inner) for p in pair]


def draw_body(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: RGB) -> None:
    outline, width = (30, 30, 30), max(2, round(r * 0.06))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
        return
    points = {
        "square": lambda: _regular_polygon(cx, cy, r * 1.25, 4, 45),
        "triangle": lambda: _regular_polygon(cx, cy + r * 0.2, r * 1.25, 3, -90),
        "star": lambda: _star(cx, cy, r * 1.3),
        "diamond": lambda: [(cx, cy - r * 1.25), (cx + r * 0.85, cy), (cx, cy + r * 1.25), (cx - r * 0.85, cy)],
        "hexagon": lambda: _regular_polygon(cx, cy, r * 1.1, 6, 0),
    }[shape]()
    d.polygon(points, fill=fill, outline=outline, width=width)


def draw_face(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> tuple[float, float, float]:
    """Two eyes and a mouth; returns (eye y, eye x offset, eye radius) for accessories."""
    ey, ex, er = cy - r * 0.1, r * 0.32, r * 0.16
    for sx in (-1, 1):
        x = cx + sx * ex
        d.ellipse([x - er, ey - er, x + er, ey + er], fill=(255, 255, 255))
        d.ellipse([x - er * 0.5, ey - er * 0.3, x + er * 0.5, ey + er * 0.7], fill=(20, 20, 20))
    d.arc([cx - r * 0.25, cy + r * 0.05, cx + r * 0.25, cy + r * 0.4], 20, 160, fill=(20, 20, 20), width=max(2, round(r * 0.05)))
    return ey, ex, er


def draw_accessory(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, eyes: tuple[float, float, float]) -> None:
    ey, ex, er = eyes
    top = cy - r * 1.05
    line = max(2, round(r * 0.08))
    if kind == "hat":  # a black pointed hat with a brim
        d.polygon([(cx - r * 0.55, top + r * 0.1), (cx + r * 0.55, top + r * 0.1), (cx + r * 0.1, top - r * 0.9)], fill=(25, 25, 25))
        d.rectangle([cx - r * 0.8, top, cx + r * 0.8, top + r * 0.15], fill=(25, 25, 25))
    elif kind == "scarf":  # a white band with a hanging end
        d.rectangle([cx - r * 0.9, cy + r * 0.5, cx + r * 0.9, cy + r * 0.72], fill=(250, 250, 250))
        d.rectangle([cx + r * 0.3, cy + r * 0.5, cx + r * 0.55, cy + r * 1.2], fill=(250, 250, 250))
    elif kind == "bow":  # a pink bow on the top left
        bx, by, s = cx - r * 0.45, cy - r * 0.55, r * 0.35
        d.polygon([(bx, by), (bx - s, by - s * 0.7), (bx - s, by + s * 0.7)], fill=(255, 105, 180))
        d.polygon([(bx, by), (bx + s, by - s * 0.7), (bx + s, by + s * 0.7)], fill=(255, 105, 180))
    elif kind == "glasses":  # black rims around both eyes
        for sx in (-1, 1):
            x, gr = cx + sx * ex, er * 1.6
            d.ellipse([x - gr, ey - gr, x + gr, ey + gr], outline=(10, 10, 10), width=line)
        d.line([(cx - ex + er * 1.6, ey), (cx + ex - er * 1.6, ey)], fill=(10, 10, 10), width=line)
    elif kind == "halo":  # a gold ring floating above
        d.ellipse([cx - r * 0.7, top - r * 0.55, cx + r * 0.7, top - r * 0.2], outline=(255, 200, 0), width=line * 2)
    elif kind == "antennae":  # two stalks with round tips
        for sx in (-1, 1):
            x0, x1, y1 = cx + sx * r * 0.3, cx + sx * r * 0.6, top - r * 0.6
            d.line([(x0, top + r * 0.2), (x1, y1)], fill=(30, 30, 30), width=line)
            d.ellipse([x1 - r * 0.13, y1 - r * 0.13, x1 + r * 0.13, y1 + r * 0.13], fill=(30, 30, 30))


def draw_image(ch: Character, size: tuple[int, int], background: str, rng: random.Random) -> Image.Image:
    w, h = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    img = draw_background(background, (w, h), rng)
    d = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.2, 0.28)
    # Preferred placement plus jitter, kept inside the frame with room for the accessory.
    cx = min(max(w * (ch.center[0] + rng.uniform(-0.06, 0.06)), r * 1.3), w - r * 1.3)
    cy = min(max(h * (ch.center[1] + rng.uniform(-0.06, 0.06)), r * 2.0), h - r * 1.3)
    body = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in ch.rgb)
    draw_body(d, ch.shape, cx, cy, r, body)  # type: ignore[arg-type]
    eyes = draw_face(d, cx, cy, r)
    draw_accessory(d, ch.accessory, cx, cy, r, eyes)
    return img.resize(size, Image.Resampling.LANCZOS)


def caption_for(ch: Character) -> str:
    return f"illustration of {ch.name}, {ch.colour} {ch.shape}, {ch.accessory}"


def write_dataset(root: Path, seed: int) -> None:
    """Draw every image into `root` and write characters.json."""
    (root / IMAGE_DIR).mkdir(parents=True)
    images = []
    for c, ch in enumerate(CHARACTERS):
        for k in range(IMAGES_PER_CHARACTER):
            rng = random.Random(f"{seed}/{ch.name}/{k}")  # str seeds are stable across runs
            size = SIZES[(3 * c + k) % len(SIZES)]
            background = BACKGROUNDS[(c + k) % len(BACKGROUNDS)]
            img = draw_image(ch, size, background, rng)
            ext = ".jpg" if k in (1, 4) else ".png"  # real datasets mix formats
            rel = f"{IMAGE_DIR}/{ch.name}_{k:02d}{ext}"
            if ext == ".jpg":
                img.save(root / rel, quality=92)
            else:
                img.save(root / rel)
            caption = caption_for(ch) if k % 2 == 0 else None
            if caption is not None:
                (root / rel).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            images.append({
                "file": rel,
                "character": ch.name,
                "width": size[0],
                "height": size[1],
                "background": background,
                "caption": caption,
                "tags": ch.tags + [f"{background}_background"],
            })
    characters = [{**asdict(ch), "tags": ch.tags} for ch in CHARACTERS]
    doc = {"seed": seed, "image_dir": IMAGE_DIR, "characters": characters, "images": images}
    (root / "characters.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _settings(seed: int) -> dict:
    return {"kind": "demo_dataset", "version": KIT_VERSION, "seed": seed}


def build_demo_dataset(out_dir: Path, seed: int = 0) -> Path:
    """Write the demo dataset to `out_dir` (reused when already built with the same seed)."""
    out_dir = Path(out_dir)
    settings = _settings(seed)
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings and (out_dir / "characters.json").is_file():
        return out_dir
    # Replace only what we built ourselves; never delete a user's unrelated folder.
    if out_dir.exists() and any(out_dir.iterdir()) and not marker.is_file():
        raise UserError(f"{out_dir} exists and is not a demo dataset folder; choose another --out")
    with atomic_dir(out_dir) as tmp:
        write_dataset(tmp, seed)
        (tmp / MARKER).write_text(json.dumps(settings, indent=2) + "\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = build_demo_dataset(args.out, args.seed)
    print(f"demo dataset: {path / IMAGE_DIR} ({len(CHARACTERS) * IMAGES_PER_CHARACTER} images), ground truth in {path / 'characters.json'}")


if __name__ == "__main__":
    run_cli(main)
