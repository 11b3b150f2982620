"""A training image as one sample sees it: resized to cover its bucket with the subset's
`resize_interpolation`, cropped (centred, or at random with `random_crop`), colour-shifted with
`color_aug`, mirrored with `flip_aug`, and its alpha channel as the loss mask with `alpha_mask`
— each as kohya's dataset does it. The random choices are drawn first (draw_*), from the
sample's own rng, so that a sample's randomness is known before any pixel is read."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from library.data.buckets import BucketAssignment
from library.data.images import load_image, load_image_with_alpha

# kohya's resize_interpolation names -> PIL filters. "area" is OpenCV's INTER_AREA in kohya: pixel
# averaging (PIL's box filter) when shrinking, close to bilinear when enlarging.
FILTERS = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
}
HUE_SHIFT_LIMIT = 8  # kohya's color_aug, in OpenCV hue units (180 per turn): about ±16 degrees


def resize_filter(interpolation: str | None, shrinking: bool) -> Image.Resampling:
    """None keeps PFG's long-standing choice, lanczos (kohya's own default picks area to shrink)."""
    if interpolation == "area":
        return Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return FILTERS.get(interpolation or "lanczos", Image.Resampling.LANCZOS)


def bucket_image(image: Image.Image, assignment: BucketAssignment, interpolation: str | None = None) -> Image.Image:
    """Resize to cover the bucket, then crop it out."""
    if image.size != assignment.resized_size:
        shrinking = assignment.resized_size[0] <= image.size[0] and assignment.resized_size[1] <= image.size[1]
        image = image.resize(assignment.resized_size, resize_filter(interpolation, shrinking))
    return image.crop(assignment.crop_ltrb)


def draw_random_crop(assignment: BucketAssignment, rng: random.Random) -> BucketAssignment:
    """kohya's random_crop: the bucket anywhere in the resized image (left, then top, drawn only
    along a side that overhangs the bucket)."""
    (resized_w, resized_h), (bucket_w, bucket_h) = assignment.resized_size, assignment.bucket
    left, top = assignment.crop_ltrb[:2]
    if resized_w > bucket_w:
        left = rng.randint(0, resized_w - bucket_w)
    if resized_h > bucket_h:
        top = rng.randint(0, resized_h - bucket_h)
    return BucketAssignment(assignment.bucket, assignment.resized_size, (left, top, left + bucket_w, top + bucket_h))


@dataclass(frozen=True)
class ColorShift:
    """kohya's color_aug, one of: a hue shift (OpenCV units) or a gamma on the 0-255 values."""

    hue: float | None = None
    gamma: float | None = None


def draw_color_shift(rng: random.Random) -> ColorShift | None:
    """A third of the samples change colour, half of those by hue, half by gamma (kohya's AugHelper)."""
    if rng.random() > 0.33:
        return None
    if rng.random() > 0.5:
        return ColorShift(hue=rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
    return ColorShift(gamma=rng.uniform(0.95, 1.05))


def apply_color_shift(image: Image.Image, shift: ColorShift) -> Image.Image:
    if shift.hue is not None:
        hsv = np.asarray(image.convert("HSV")).copy()
        turn = round(shift.hue * 256 / 180)  # PIL's hue runs 0-255 per turn
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + turn) % 256).astype(np.uint8)
        return Image.fromarray(hsv, "HSV").convert("RGB")
    # kohya raises the 0-255 values themselves to the power (not the 0-1 ones), then clips
    values = np.clip(np.asarray(image, dtype=np.float64) ** shift.gamma, 0, 255).astype(np.uint8)
    return Image.fromarray(values, "RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB -> (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def sample_pixels(image_path: Path, assignment: BucketAssignment, flip: bool, interpolation: str | None = None,
                  color: ColorShift | None = None, with_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pixels (3, H, W) in [-1, 1], the alpha mask (H, W) in [0, 1] with `with_mask`, else None).
    An image without alpha has a mask of ones, as in kohya. The RGB is the same as without a mask
    (transparency on white), so cached latents and masked runs see the same pixels."""
    if with_mask:
        image, alpha = load_image_with_alpha(image_path)
        alpha = alpha if alpha is not None else Image.new("L", image.size, 255)
    else:
        image, alpha = load_image(image_path), None
    image = bucket_image(image, assignment, interpolation)
    if color is not None:
        image = apply_color_shift(image, color)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mask = None
    if alpha is not None:
        alpha = bucket_image(alpha, assignment, interpolation)
        if flip:
            alpha = alpha.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)
    return to_tensor(image), mask


def latent_mask(image_path: Path, assignment: BucketAssignment, interpolation: str | None,
                size: tuple[int, int]) -> torch.Tensor:
    """The alpha mask scaled to the latents' (h, w) by area, as kohya's masked loss scales it."""
    _, mask = sample_pixels(image_path, assignment, False, interpolation, with_mask=True)
    return F.interpolate(mask[None, None], size=tuple(size), mode="area")[0, 0]
