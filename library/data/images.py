"""Robust image loading: any real-world file becomes an RGB PIL image, or a clear ImageLoadError.

Datasets scraped from the web hold CMYK JPEGs, 16-bit PNGs, palette GIFs with transparency,
rotated phone photos and the odd broken or huge file; one of them must never stop a run over
100k images, and none may be silently mangled.
"""
from __future__ import annotations

import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

# PIL's own hard limit (2x MAX_IMAGE_PIXELS, about 179 megapixels); above it we refuse the file.
MAX_PIXELS = 2 * 89_478_485

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif") + ((".avif",) if features.check("avif") else ())

T = TypeVar("T")

# What Pillow raises while reading a damaged file's header or EXIF block (found by fuzzing EXIF
# bytes of real JPEGs): these make a file unusable, or, for EXIF, only its rotation unknown.
HEADER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
# exif_transpose on a malformed EXIF block: Pillow's own parser fails with these (a TypeError from
# a bytes fill value, an AttributeError from a float where it expects text, struct.error).
EXIF_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, SyntaxError, struct.error)


class ImageLoadError(Exception):
    """A file that cannot be used as an image; `reason` is one short phrase for the user."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (by extension, case-insensitive), sorted for a stable order."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the header alone; EXIF rotation swaps the sides as load_image will."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except HEADER_ERRORS as e:
        raise ImageLoadError(path, f"cannot read image header ({type(e).__name__}: {e})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image as RGB: EXIF rotation applied, first frame of animations, alpha on white."""
    return to_rgb(_open(Path(path), max_pixels))


def load_image_with_alpha(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, Image.Image | None]:
    """(RGB as load_image gives it, its alpha channel as an "L" image, or None without one): for
    kohya's alpha_mask, where transparency weighs the loss."""
    im = _open(Path(path), max_pixels)
    alpha = im.convert("RGBA").getchannel("A") if has_alpha(im) else None
    return to_rgb(im), alpha


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _open(path: Path, max_pixels: int) -> Image.Image:
    """The decoded first frame, EXIF rotation applied, in its own mode."""
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)")
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageLoadError(path, f"{w}x{h} is {w * h:,} pixels, above the decompression-bomb limit of {max_pixels:,}")
            im.load()  # first frame only; decoding errors surface here
            return _apply_exif_rotation(im)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (unrecognized format)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"decompression-bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(path, f"corrupt or truncated image ({e})") from None


def _apply_exif_rotation(im: Image.Image) -> Image.Image:
    try:
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an unrotated picture
    except EXIF_ERRORS:  # a malformed EXIF block should not cost the picture; keep it unrotated
        pass
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white (the WD convention)."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale: PIL's own conversion clips at 255, so scale the full range down instead
        arr = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if has_alpha(im):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def prefetch(items: Iterable[T], fn: Callable[[T], object], workers: int, ahead: int) -> Iterator[tuple[T, object | None, ImageLoadError | None]]:
    """Run `fn` over items in a thread pool, at most `ahead` in flight, yielding in input order.

    Yields (item, result, None) or (item, None, error) for an ImageLoadError, so a bad file is
    reported and the stream goes on. The bound keeps memory flat on huge datasets while decoding
    overlaps with whatever the consumer does (e.g. model inference, which releases the GIL).
    """
    it = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prefetch") as pool:
        pending: deque = deque()
        for item in it:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= max(1, ahead):
                break
        while pending:
            item, future = pending.popleft()
            nxt = next(it, _END)
            if nxt is not _END:
                pending.append((nxt, pool.submit(fn, nxt)))
            try:
                yield item, future.result(), None
            except ImageLoadError as e:
                yield item, None, e


_END = object()
