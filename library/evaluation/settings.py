"""Every eval_pfg.py option, typed. The command line and `--config_file` both fill this."""
from __future__ import annotations

from dataclasses import dataclass

from library.cli_config import setting
from library.errors import UserError
from library.sample.settings import ModelSettings


@dataclass(frozen=True)
class EvalSettings(ModelSettings):
    """The model under test takes the same flags as in gen_pfg.py (ModelSettings)."""

    # the held-out images
    dataset_config: str = setting("", "dataset TOML of the held-out images (images the training never saw)")
    train_data_dir: str = setting("", "a folder of held-out images, when no dataset TOML is given")
    resolution: str = setting("512", "resolution of --train_data_dir images, 'W' or 'W,H' (dataset TOML values win)")
    pfg_prompt: str = setting("illustration of *", "caption of held-out images without a caption file or class_tokens")
    num_images: int = setting(0, "evaluate at most this many held-out images (0 = all), in file order")
    # the denoising metrics
    num_timesteps: int = setting(8, "timesteps evenly across the noise schedule, the same for every image")
    candidates: int = setting(8, "K: the own vector plus K-1 other held-out vectors per image (at most the image count)")
    n_boot: int = setting(1000, "bootstrap resamples of the gain's 95% interval")
    seed: int = setting(0, "seed of the noise, the candidate sets, the bootstrap and the generation")
    # generation retrieval
    generate: bool = setting(True, "also generate from every held-out image and measure its similarity (--no-generate skips)")
    images_per_guide: int = setting(4, "images generated from each guide (seeds differ); more average out the luck of single seeds")
    second_encoder: str = setting("", "an independent encoder for generation retrieval too: generation_retrieval_second (a CLIP vision folder gives IP-Adapter's CLIP-I)")
    # outputs and devices
    output_json: str = setting("", "write every number as JSON here")
    contact_sheet: str = setting("", "write a PNG here: each guide image beside what the model generated from it, each labelled with the guide it is nearest to")

    def validate(self) -> None:
        self.validate_model()
        if not self.pfg_weights:
            raise UserError("--pfg_weights is required: it is what gets evaluated")
        if bool(self.dataset_config) == bool(self.train_data_dir):
            raise UserError("give exactly one of --dataset_config and --train_data_dir (the held-out images)")
        if self.generate and not self.tagger_model:
            raise UserError("generation retrieval encodes the generated images: pass --tagger_model (or --no-generate)")
        if self.contact_sheet and not self.generate:
            raise UserError("--contact_sheet shows generated images: it cannot be combined with --no-generate")
        if self.num_timesteps < 1:
            raise UserError(f"--num_timesteps must be at least 1, got {self.num_timesteps}")
        if self.candidates < 2:
            raise UserError(f"--candidates must be at least 2 (the own vector and one other), got {self.candidates}")
        if self.images_per_guide < 1:
            raise UserError(f"--images_per_guide must be at least 1, got {self.images_per_guide}")
        if self.num_images < 0 or self.n_boot < 1:
            raise UserError("--num_images must be >= 0 and --n_boot >= 1")
