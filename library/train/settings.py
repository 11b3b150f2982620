"""Every train_pfg.py option, typed, in one place. The command line and `--config_file` both
fill this; the resolved object is saved next to the outputs as `NAME-settings.toml`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from library.cli_config import setting
from library.errors import UserError

STATE_FILE = "train_state.json"  # marks a --save_state folder: epoch, global step, data position


@dataclass(frozen=True)
class TrainSettings:
    # model and data
    pretrained_model_name_or_path: str = setting("", "SD1.x/SD2.x/SDXL diffusers folder, single-file checkpoint or hub id")
    dataset_config: str = setting("", "kohya-style dataset TOML")
    train_data_dir: str = setting("", "a folder of images, when no dataset TOML is given")
    vae: str = setting("", "replace the model's VAE (e.g. an fp16-safe SDXL VAE): a single-file VAE or a diffusers VAE folder")
    tagger_model: str = setting("", "image encoder used to compute missing feature caches (WD tagger folder/.onnx/hub id)")
    output_dir: str = setting("output", "where outputs are written")
    output_name: str = setting("pfg", "base name of the outputs: NAME-pfg.safetensors, NAME.safetensors ...")
    resolution: str = setting("512", "training resolution, 'W' or 'W,H' (dataset TOML values win)")
    train_batch_size: int = setting(1, "batch size when the dataset TOML does not set one")
    # what is trained
    train_unet: str = setting("full", "none: PFG head only; full: PFG head + whole UNet; lora: PFG head + a LoRA on the UNet", choices=("none", "full", "lora"))
    network_dim: int = setting(16, "LoRA rank of the attention/feed-forward layers (--train_unet lora)")
    network_alpha: float = setting(8.0, "LoRA alpha: the update is scaled by alpha / rank")
    network_conv_dim: int = setting(0, "LoRA rank of the 3x3 convs in ResNet/down/upsample blocks (0 = no conv LoRA)")
    network_conv_alpha: float = setting(1.0, "LoRA alpha of the 3x3 convs")
    network_weights: str = setting("", "continue training this kohya LoRA file (its own ranks and alphas are kept)")
    pfg_num_tokens: int = setting(10, "number of PFG tokens N appended to the text states")
    pfg_hidden_dim: int = setting(0, "0: the original single Linear; >0: Linear -> GELU -> Linear with this width")
    pfg_dropout: float = setting(0.0, "probability of replacing a sample's PFG tokens by the unconditional padding")
    pfg_pooled: bool = setting(False, "SDXL: the PFG head also learns a vector added to the pooled text embedding (starts at zero)")
    pfg_prompt: str = setting("illustration of *", "caption for images without a caption file or class_tokens")
    uncond: str = setting("zeros", "unconditional padding used by --pfg_dropout", choices=("zeros", "eos"))
    resume_pfg: str = setting("", "start from an existing PFG file (ours or an original .pt)")
    # text
    clip_skip: int = setting(1, "use the output of the k-th last text encoder layer (2 = penultimate)")
    max_token_length: int = setting(75, "75, 150 or 225: longer captions are encoded in 75-token chunks", choices=(75, 150, 225))
    # optimisation
    optimizer_type: str = setting("AdamW8bit", "AdamW8bit, AdamW, Lion, Lion8bit, Prodigy, Adafactor or a dotted class path")
    optimizer_args: list[str] = setting([], "extra optimizer arguments, key=value")
    learning_rate: float = setting(1e-5, "learning rate of the UNet (full) or of the LoRA (lora)")
    pfg_learning_rate: float = setting(1e-4, "learning rate of the PFG head")
    lr_scheduler: str = setting("constant", "diffusers LR scheduler: constant, constant_with_warmup, linear, cosine, ...")
    lr_warmup_steps: int = setting(0, "warmup steps of the LR scheduler")
    max_train_steps: int = setting(1000, "number of optimizer steps")
    max_train_epochs: int = setting(0, "if > 0, overrides --max_train_steps")
    gradient_accumulation_steps: int = setting(1, "batches per optimizer step")
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 = off)")
    noise_offset: float = setting(0.0, "noise offset (0 = off)")
    min_snr_gamma: float = setting(0.0, "Min-SNR weighting gamma (0 = off; 5 is typical)")
    v_parameterization: bool | None = setting(None, "train with v-prediction (detected from the scheduler config when present); --no-v_parameterization forces epsilon")
    seed: int = setting(42, "random seed")
    # precision and speed
    mixed_precision: str = setting("no", "autocast precision", choices=("no", "fp16", "bf16"))
    full_bf16: bool = setting(False, "keep the trained weights themselves in bf16")
    gradient_checkpointing: bool = setting(False, "recompute UNet activations in the backward pass to save memory")
    sdpa: bool = setting(False, "torch scaled-dot-product attention (the default)")
    xformers: bool = setting(False, "xformers attention (CUDA only, optional install)")
    cache_latents: bool = setting(False, "encode all latents once before training and keep them in memory")
    cache_latents_to_disk: bool = setting(False, "like --cache_latents but stored in validated *_sd.npz files")
    dataloader_workers: int = setting(0, "DataLoader worker processes")
    # outputs
    save_model_as: str = setting("safetensors", "full UNet output: single-file safetensors/ckpt, or a diffusers folder", choices=("safetensors", "ckpt", "diffusers"))
    save_precision: str = setting("float", "dtype of saved weights", choices=("float", "fp16", "bf16"))
    save_pfg_pt: bool = setting(False, "also write NAME-pfg.pt for loaders that only read .pt")
    save_every_n_steps: int = setting(0, "save every N steps (0 = only at the end)")
    save_every_n_epochs: int = setting(0, "save every N epochs (0 = off)")
    save_last_n: int = setting(0, "keep only the last N intermediate saves (0 = keep all)")
    save_state: bool = setting(False, "also save the accelerate training state (for --resume)")
    resume: str = setting("", "a NAME-state folder to continue from")
    logging_dir: str = setting("", "tensorboard log folder")
    log_with: str = setting("", "tensorboard or wandb (default: tensorboard when --logging_dir is set)", choices=("", "tensorboard", "wandb", "all"))
    # validation on held-out images (same metric as eval_pfg.py)
    validation_split: float = setting(0.0, "fraction of the images held out for validation (0 = none)")
    validation_every_n_steps: int = setting(0, "validate every N steps (always at the end when --validation_split is set)")
    validation_timesteps: int = setting(4, "fixed timesteps, spread over the schedule, of the validation loss")
    validation_candidates: int = setting(8, "vectors compared per held-out image (its own + K-1 others) for retrieval")
    # sample images during training
    sample_prompts: str = setting("", "prompt file (kohya line syntax, --i guide images) rendered during training")
    sample_every_n_steps: int = setting(0, "render the sample prompts every N steps")
    sample_every_n_epochs: int = setting(0, "render the sample prompts every N epochs")
    sample_sampler: str = setting("euler_a", "sampler of the training samples (gen_pfg.py --sampler names)")

    @property
    def attention(self) -> str:
        return "xformers" if self.xformers else "sdpa"

    @property
    def resolution_wh(self) -> tuple[int, int]:
        parts = [p for p in self.resolution.replace("x", ",").split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UserError(f"--resolution must be 'W' or 'W,H', got {self.resolution!r}") from None
        if len(values) == 1:
            values = values * 2
        if len(values) != 2 or min(values) <= 0:
            raise UserError(f"--resolution must be 'W' or 'W,H', got {self.resolution!r}")
        return values[0], values[1]

    def validate(self) -> None:
        """Impossible combinations fail here, before any model loads."""
        if not self.pretrained_model_name_or_path:
            raise UserError("--pretrained_model_name_or_path is required")
        if bool(self.dataset_config) == bool(self.train_data_dir):
            raise UserError("give exactly one of --dataset_config and --train_data_dir")
        if self.sdpa and self.xformers:
            raise UserError("--sdpa and --xformers exclude each other")
        if not 0.0 <= self.pfg_dropout <= 1.0:
            raise UserError(f"--pfg_dropout must be within [0, 1], got {self.pfg_dropout}")
        if self.pfg_num_tokens < 1:
            raise UserError(f"--pfg_num_tokens must be at least 1, got {self.pfg_num_tokens}")
        if self.max_train_steps < 1 and self.max_train_epochs < 1:
            raise UserError("--max_train_steps (or --max_train_epochs) must be at least 1")
        if self.gradient_accumulation_steps < 1:
            raise UserError("--gradient_accumulation_steps must be at least 1")
        if self.network_dim < 1 or self.network_conv_dim < 0:
            raise UserError(f"--network_dim must be at least 1 and --network_conv_dim at least 0, got {self.network_dim} and {self.network_conv_dim}")
        if self.network_alpha <= 0 or self.network_conv_alpha <= 0:
            raise UserError(f"--network_alpha and --network_conv_alpha must be positive, got {self.network_alpha} and {self.network_conv_alpha}")
        if self.network_weights and self.train_unet != "lora":
            raise UserError("--network_weights needs --train_unet lora")
        if not 0.0 <= self.validation_split < 1.0:
            raise UserError(f"--validation_split must be within [0, 1), got {self.validation_split}")
        if self.validation_timesteps < 1 or self.validation_candidates < 2:
            raise UserError("--validation_timesteps must be at least 1 and --validation_candidates at least 2")
        if self.sample_prompts and not (self.sample_every_n_steps or self.sample_every_n_epochs):
            raise UserError("--sample_prompts needs --sample_every_n_steps or --sample_every_n_epochs")
        if self.log_with in ("tensorboard", "all") and not self.logging_dir:
            raise UserError(f"--log_with {self.log_with} needs --logging_dir")
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise UserError("--full_bf16 needs --mixed_precision bf16")
        self.resolution_wh  # noqa: B018 - validates the string
        self._validate_optimizer()
        self._validate_resume()

    def _validate_optimizer(self) -> None:
        """The class resolves (packages installed, dotted path imports) and takes these arguments."""
        from library.train.optim import check_optimizer

        check_optimizer(self.optimizer_type, self.optimizer_args)

    def _validate_resume(self) -> None:
        if not self.resume:
            return
        folder = Path(self.resume)
        if not folder.is_dir():
            raise UserError(f"--resume {self.resume}: no such folder (give a NAME-state folder written with --save_state)")
        state = folder / STATE_FILE
        if not state.is_file():
            raise UserError(f"--resume {self.resume}: not a training state folder (no {STATE_FILE}; "
                            "give a NAME-state folder written with --save_state)")
        try:
            progress = json.loads(state.read_text())
            valid = isinstance(progress, dict) and all(isinstance(progress.get(k), int) for k in ("epoch", "global_step", "batch_in_epoch"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            valid = False
        if not valid:
            raise UserError(f"--resume {self.resume}: {STATE_FILE} is unreadable or incomplete (needs epoch, global_step, batch_in_epoch)")
