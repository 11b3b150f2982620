"""Every prepare_features.py option, typed. The command line and `--config_file` both fill this."""
from __future__ import annotations

import os
from dataclasses import dataclass

from library.cli_config import setting
from library.data.dataset_schema import parse_resolution
from library.errors import UserError
from library.models.image_encoders import ENCODER_KINDS

DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class PrepareSettings:
    # the images
    train_data_dir: str = setting("", "folder of training images (kohya's <repeats>_<name> subfolders work too)")
    dataset_config: str = setting("", "kohya-style dataset TOML; every subset's image_dir (or metadata_file) is processed")
    reg_data_dir: str = setting("", "kohya's regularisation images folder, beside --train_data_dir")
    in_json: str = setting("", "kohya's fine-tuning metadata JSON of --train_data_dir: its entries are the images")
    # the image encoder
    tagger_model: str = setting("", "the image encoder: WD tagger folder (model.onnx + selected_tags.csv), .onnx file or hub id; "
                                    "or a CLIP vision folder (config.json + safetensors, from save_pretrained) or hub id")
    encoder: str = setting("auto", "wd: ONNX WD tagger (pooled pre-classifier vector); clip: transformers CLIPVisionModelWithProjection "
                                   "(projected image embedding); auto: clip for a folder with config.json and no .onnx, else wd "
                                   "(hub ids are wd unless --encoder clip)", choices=ENCODER_KINDS)
    feature_tensor: str = setting("", "WD only: name of the graph tensor to use as the feature (found automatically if empty)")
    batch_size: int = setting(32, "images per encoder batch")
    device: str = setting("", "cpu, cuda or cuda:N (empty: cuda when available)")
    num_workers: int = setting(DEFAULT_WORKERS, "image decoding threads")
    cache_dir: str = setting("", "write caches here instead of beside the images (--train_data_dir only; train with a dataset "
                                 "TOML whose subsets set the same cache_dir)")
    recursive: bool = setting(False, "with --train_data_dir: also the images in its subfolders, each folder as a subset of its own "
                                     "(kohya's tagger flag; hidden folders are left out). Train on them with a dataset TOML listing the folders")
    # tag captions (WD taggers)
    write_tags: bool = setting(False, "write kohya-style tag captions from the same forward pass")
    tag_threshold: float = setting(0.35, "probability threshold of general tags")
    character_threshold: float = setting(0.85, "probability threshold of character tags")
    include_rating: bool = setting(False, "start each caption with the most likely rating tag")
    caption_extension: str = setting(".txt", "caption file extension (set the same caption_extension in the dataset TOML)")
    overwrite_captions: bool = setting(False, "replace existing caption files (default: keep them)")
    # latent caches (for train_pfg.py --cache_latents_to_disk)
    cache_latents: bool = setting(False, "also write the VAE latent caches at each image's bucket resolution")
    pretrained_model_name_or_path: str = setting("", "the SD model whose VAE encodes the latents (diffusers folder, single file or hub id)")
    resolution: str = setting("512", "training resolution 'W' or 'W,H' where the dataset TOML sets none (as train_pfg.py --resolution)")
    vae_batch_size: int = setting(8, "images per VAE batch")

    @property
    def resolution_wh(self) -> tuple[int, int]:
        try:
            return parse_resolution(self.resolution)
        except ValueError as e:
            raise UserError(f"--resolution: {e}") from None

    def validate(self) -> None:
        """Impossible values and combinations fail here, before any model loads."""
        if bool(self.train_data_dir) == bool(self.dataset_config):
            raise UserError("give exactly one of --train_data_dir and --dataset_config")
        if not self.tagger_model:
            raise UserError("--tagger_model is required (the image encoder whose vectors PFG trains on)")
        for name in ("batch_size", "num_workers", "vae_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.cache_dir and self.dataset_config:
            raise UserError("--cache_dir applies to --train_data_dir; with --dataset_config set cache_dir in the subsets")
        if self.recursive and self.dataset_config:
            raise UserError("--recursive applies to --train_data_dir; with --dataset_config list each folder as a subset")
        if self.cache_latents and not self.pretrained_model_name_or_path:
            raise UserError("--cache_latents needs --pretrained_model_name_or_path (the SD model whose VAE the trainer uses)")
        for name in ("tag_threshold", "character_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name} must be within [0, 1], got {getattr(self, name)}")
        if not self.caption_extension.startswith("."):
            raise UserError(f"--caption_extension must start with a dot, got {self.caption_extension!r}")
        self.resolution_wh  # noqa: B018 - validates the string
