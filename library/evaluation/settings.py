"""Every eval_pfg.py option, typed. The command line and `--config_file` both fill this."""
from __future__ import annotations

from dataclasses import dataclass

from library.cli_config import setting
from library.errors import UserError
from library.sample.sampler import SAMPLERS


@dataclass(frozen=True)
class EvalSettings:
    # the model under test (the same flags as gen_pfg.py)
    pretrained_model_name_or_path: str = setting("", "SD1.x/SD2.x diffusers folder, single-file checkpoint or hub id")
    vae: str = setting("", "replace the model's VAE: a single-file VAE or a diffusers VAE folder")
    v_parameterization: bool | None = setting(None, "the model predicts v (needed for v-models given as single files without metadata)")
    pfg_weights: str = setting("", "NAME-pfg.safetensors (or an original .pt PFG file) to evaluate")
    tagger_model: str = setting("", "the image encoder the PFG head was trained with: WD tagger folder, .onnx, CLIP folder or hub id")
    feature_tensor: str = setting("", "name of the pooled-vector tensor inside the tagger graph (found automatically if empty)")
    network_weights: list[str] = setting([], "LoRA files, repeatable")
    network_mul: list[float] = setting([], "strength per LoRA file (default 1.0 each)")
    clip_skip: int = setting(1, "use the k-th last text encoder layer (2 = penultimate)")
    uncond: str = setting("zeros", "padding of the unconditional branch when generating", choices=("zeros", "eos"))
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
    second_encoder: str = setting("", "an independent encoder for generation retrieval too (e.g. a CLIP vision folder)")
    prompt: str = setting("illustration of *", "prompt for generation: the guide image alone should carry identity")
    negative_prompt: str = setting("", "negative prompt for generation")
    pfg_scale: float = setting(1.0, "tokens = pfg_scale * PFG(feature)")
    W: int = setting(0, "generated image width (multiple of 8); 0 = from the model, as in gen_pfg.py (its bucket nearest the guide's aspect ratio)")
    H: int = setting(0, "generated image height (multiple of 8); 0 = from the model, as for --W")
    steps: int = setting(28, "sampling steps")
    scale: float = setting(7.0, "CFG scale")
    sampler: str = setting("euler_a", "sampler", choices=tuple(SAMPLERS))
    # outputs and devices
    output_json: str = setting("", "write every number as JSON here")
    contact_sheet: str = setting("", "write a PNG here: each guide image beside what the model generated from it")
    device: str = setting("", "cuda or cpu (default: cuda when available)")
    dtype: str = setting("fp32", "model dtype", choices=("fp32", "fp16", "bf16"))

    def validate(self) -> None:
        if not self.pretrained_model_name_or_path:
            raise UserError("--pretrained_model_name_or_path is required")
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
        if self.W % 8 or self.H % 8 or self.W < 0 or self.H < 0:
            raise UserError(f"--W and --H must be multiples of 8 (0 = from the model), got {self.W}x{self.H}")
        if self.network_mul and len(self.network_mul) != len(self.network_weights):
            raise UserError(f"--network_mul has {len(self.network_mul)} values for {len(self.network_weights)} --network_weights files")
