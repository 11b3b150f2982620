"""The CLIP image encoder family: transformers' CLIPVisionModelWithProjection, from a
save_pretrained folder or a hub repo (optionally a subfolder of one, as IP-Adapter ships its
image encoder: `h94/IP-Adapter/models/image_encoder`). The vector is the projected image
embedding, the same one CLIPModel.get_image_features gives, so a full CLIP checkpoint (text and
vision towers) works as well as a vision-only one."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from library.data.images import to_rgb
from library.errors import UserError
from library.fileio import file_hash

# What transformers loads, in the order it prefers; only one is downloaded and hashed. Hub CLIP
# repos often also hold open_clip, fp16, flax or TF copies of the same weights (gigabytes each).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HUB_SPEC = re.compile(r"[\w.-]+/[\w.-]+(/[\w.-]+)*")


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers will read from `folder` (shards listed by their index)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                return [folder / shard for shard in sorted(set(json.loads(path.read_text())["weight_map"].values()))]
            return [path]
    return []


class ClipVisionEncoder:
    """CLIPVisionModelWithProjection + its CLIPImageProcessor; the vector is the projected image
    embedding (`image_embeds`, D = projection_dim)."""

    def __init__(self, folder: Path, name: str, device: str = "cpu"):
        import torch
        from transformers import CLIPImageProcessor

        weights = weight_files(folder)
        if not (folder / "config.json").is_file() or not weights:
            raise UserError(f"CLIP model folder {folder} needs config.json and model.safetensors (as save_pretrained writes them)")
        missing = [p.name for p in weights if not p.is_file()]
        if missing:
            raise UserError(f"CLIP model folder {folder} lacks the weight shards {', '.join(missing)}")
        try:
            self.model = _load_vision_tower(folder)
            if (folder / "preprocessor_config.json").is_file():
                self.processor = CLIPImageProcessor.from_pretrained(folder)
            else:  # IP-Adapter's image_encoder folder has none; it preprocesses with CLIP's stock recipe
                size = int(self.model.config.image_size)
                print(f"{folder} has no preprocessor_config.json: using CLIP's standard preprocessing at {size}x{size}")
                self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load {folder} as a CLIP vision model ({type(e).__name__}: {e})") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            print("CUDA is not available to torch; running the CLIP encoder on CPU")
            device = "cpu"
        elif not device.startswith(("cuda", "cpu")):
            raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
        self.device = torch.device(device)
        self.model.to(self.device)
        self.provider = f"torch {self.device}"
        print(f"CLIP vision encoder {folder}: {self.provider}")
        digest = hashlib.sha256()
        for path in weights:  # sharded checkpoints: every shard, in name order
            digest.update(file_hash(path, 64).encode())
        self.encoder_id = f"{name}:{digest.hexdigest()[:12]}"
        self.dim = int(self.model.config.projection_dim)
        self.probs_name = None
        self.item_shape = self.preprocess(Image.new("RGB", (64, 64))).shape

    def preprocess(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        pixels = self.processor(images=to_rgb(image), return_tensors="np")["pixel_values"][0].astype(np.float32, copy=False)
        if out is None:
            return pixels
        np.copyto(out, pixels)
        return out

    def encode_batch(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, self.model.dtype)
            embeds = self.model(pixel_values=pixels).image_embeds
        return embeds.float().cpu().numpy()

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        return self.encode_batch(np.stack([self.preprocess(im) for im in images]))


def _load_vision_tower(folder: Path):
    """CLIPVisionModelWithProjection from a vision-only or a full CLIP checkpoint, every weight
    loaded. From a full one, transformers would take projection_dim from the vision sub-config, which
    need not match the top-level projection_dim of the checkpoint, and would then re-initialise
    the projection at random with only a log line; the top-level value is the real one."""
    from transformers import AutoConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging

    config = AutoConfig.from_pretrained(folder)
    if config.model_type == "clip":  # a full CLIPModel: its vision tower and visual projection
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        config = vision
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a full checkpoint's text tower is "unexpected": expected here
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(folder, config=config, output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
    bad = sorted(info["missing_keys"]) + sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info["mismatched_keys"])
    if bad:
        raise UserError(f"{folder} is not a complete CLIP vision model: {len(bad)} weights missing or of the wrong shape "
                        f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    return model.eval()


def resolve_clip(spec: str) -> tuple[Path, str]:
    """(local folder, display name) of a CLIP model folder, hub id or hub id + subfolder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, path.resolve().name
    if not HUB_SPEC.fullmatch(spec) or path.exists():
        raise UserError(f"CLIP model not found: {spec} (expected a save_pretrained folder, a hub id or hub-id/subfolder)")
    from library.models.hub import download_clip

    return download_clip(spec, WEIGHT_FILES), spec.split("/")[-1]
