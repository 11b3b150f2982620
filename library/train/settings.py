"""Every train_pfg.py option, typed, in one place. The command line and `--config_file` both
fill this; the resolved object is saved next to the outputs as `NAME-settings.toml`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from library.cli_config import setting
from library.errors import UserError
from library.train.state import LATEST, check_state


# kohya flags (and config keys) with no equivalent here: the one-line hint instead of "unrecognized".
FLAG_HINTS = {
    "text_encoder_lr": "PFG keeps the text encoder frozen (no LoRA on it, no rate); drop it (the PFG head's rate is --pfg_learning_rate)",
    "network_train_text_encoder_only": "PFG never trains the text encoder; --train_unet none trains the PFG head alone",
    "network_dropout": "kohya's LoRA dropout is not implemented here; drop it",
    "mem_eff_attn": "use --sdpa (what runs by default) or --xformers",
    "cache_text_encoder_outputs": "not needed: the frozen text encoder's states are kept per caption by itself",
    "cache_text_encoder_outputs_to_disk": "not needed: the frozen text encoder's states are kept per caption by itself",
    "prior_loss_weight": "PFG training has no prior-preservation loss (is_reg images train like the others)",
    "lowram": "not needed here; drop it",
    "highvram": "not needed here; drop it",
    "vae_batch_size": "latent caches are written by prepare_features.py --cache_latents --vae_batch_size N",
    "loss_type": "PFG trains with the L2 (MSE) loss only",
    "huber_c": "PFG trains with the L2 (MSE) loss only",
    "huber_schedule": "PFG trains with the L2 (MSE) loss only",
    "ip_noise_gamma": "not implemented; --noise_offset is",
    "multires_noise_iterations": "not implemented; --noise_offset is",
    "multires_noise_discount": "not implemented; --noise_offset is",
    "adaptive_noise_scale": "not implemented; --noise_offset is",
    "zero_terminal_snr": "not implemented here",
    "scale_weight_norms": "not implemented here",
    "lr_scheduler_num_cycles": "not implemented: --lr_scheduler takes diffusers' schedulers with their default shape",
    "lr_scheduler_power": "not implemented: --lr_scheduler takes diffusers' schedulers with their default shape",
    "save_last_n_steps": "kohya keeps the saves of the last N steps; here --save_last_n K keeps the last K intermediate saves",
    "save_n_epoch_ratio": "use --save_every_n_epochs",
    "save_state_on_train_end": "--save_state already saves the state at the end (and at every save point)",
    "dim_from_weights": "not needed: --network_weights keeps the file's own ranks and alphas",
    "tokenizer_cache_dir": "not needed: the tokenizer comes with the model (bundled for single files)",
    "face_crop_aug_range": "kohya's face crop reads face positions from the file names, which PFG's bucketing does not; random_crop works",
    "conditioning_data_dir": "mask images are not supported: give the images an alpha channel and use --alpha_mask (or alpha_mask = true)",
    "no_metadata": "outputs always carry their metadata here",
    "log_prefix": "not implemented: logs go to --logging_dir as they are",
    "wandb_api_key": "log in once with `wandb login`; --log_with wandb then uses that account",
    "training_comment": "not recorded here",
}
LORA_MODULES = ("networks.lora",)


@dataclass(frozen=True)
class TrainSettings:
    # model and data
    pretrained_model_name_or_path: str = setting("", "SD1.x/SD2.x/SDXL diffusers folder, single-file checkpoint or hub id")
    dataset_config: str = setting("", "kohya-style dataset TOML")
    train_data_dir: str = setting("", "a folder of images, when no dataset TOML is given (kohya's <repeats>_<class tokens> subfolders work)")
    vae: str = setting("", "replace the model's VAE (e.g. an fp16-safe SDXL VAE): a single-file VAE or a diffusers VAE folder")
    tagger_model: str = setting("", "image encoder used to compute missing feature caches (WD tagger folder/.onnx/hub id)")
    output_dir: str = setting("output", "where outputs are written")
    output_name: str = setting("pfg", "base name of the outputs: NAME-pfg.safetensors, NAME.safetensors ...")
    resolution: str = setting("512", "training resolution, 'W' or 'W,H' (dataset TOML values win)")
    train_batch_size: int = setting(1, "batch size when the dataset TOML does not set one")
    debug_dataset: bool = setting(False, "print every sample of the first epoch (image, bucket, the caption the text encoder gets), then exit without training")
    # what is trained
    train_unet: str = setting("full", "none: PFG head only; full: PFG head + whole UNet; lora: PFG head + a LoRA on the UNet", choices=("none", "full", "lora"))
    network_dim: int = setting(16, "LoRA rank of the attention/feed-forward layers (--train_unet lora)")
    network_alpha: float = setting(8.0, "LoRA alpha: the update is scaled by alpha / rank")
    network_conv_dim: int = setting(0, "LoRA rank of the 3x3 convs in ResNet/down/upsample blocks (0 = no conv LoRA)")
    network_conv_alpha: float = setting(1.0, "LoRA alpha of the 3x3 convs")
    network_weights: str = setting("", "continue training this kohya LoRA file (its own ranks and alphas are kept)")
    network_module: str = setting("", "kohya's LoRA switch: networks.lora means --train_unet lora")
    network_args: list[str] = setting([], "kohya's LoRA arguments: conv_dim=N and conv_alpha=A (= --network_conv_dim / --network_conv_alpha)")
    network_train_unet_only: bool = setting(False, "kohya's flag, accepted: PFG trains no text encoder LoRA anyway")
    v2: bool = setting(False, "kohya's flag, accepted: SD2 is recognised from the model itself")
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
    unet_lr: float | None = setting(None, "kohya's name for the UNet/LoRA rate: wins over --learning_rate when given")
    pfg_learning_rate: float = setting(1e-4, "learning rate of the PFG head")
    lr_scheduler: str = setting("constant", "diffusers LR scheduler: constant, constant_with_warmup, linear, cosine, ...")
    lr_warmup_steps: int = setting(0, "warmup steps of the LR scheduler")
    max_train_steps: int = setting(1000, "number of optimizer steps")
    max_train_epochs: int = setting(0, "if > 0, overrides --max_train_steps")
    gradient_accumulation_steps: int = setting(1, "batches per optimizer step")
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 = off)")
    noise_offset: float = setting(0.0, "noise offset (0 = off)")
    min_snr_gamma: float = setting(0.0, "Min-SNR weighting gamma (0 = off; 5 is typical)")
    masked_loss: bool = setting(False, "weigh the loss by the images' alpha channel (kohya's masked loss; needs alpha_mask subsets or --alpha_mask)")
    v_parameterization: bool | None = setting(None, "train with v-prediction (detected from the scheduler config when present); --no-v_parameterization forces epsilon")
    seed: int = setting(42, "random seed")
    # precision and speed
    mixed_precision: str = setting("no", "autocast precision", choices=("no", "fp16", "bf16"))
    full_bf16: bool = setting(False, "keep the trained weights themselves in bf16")
    gradient_checkpointing: bool = setting(False, "recompute UNet activations in the backward pass to save memory")
    sdpa: bool = setting(False, "torch scaled-dot-product attention", default_note="used unless --xformers")
    xformers: bool = setting(False, "xformers attention (CUDA only, optional install)")
    no_half_vae: bool = setting(False, "keep the VAE in fp32 under --mixed_precision fp16/bf16 (kohya's flag)")
    full_fp16: bool = setting(False, "keep the trained weights themselves in fp16 (needs --mixed_precision fp16; kohya's flag)")
    cache_latents: bool = setting(False, "encode all latents once before training and keep them in memory")
    cache_latents_to_disk: bool = setting(False, "encode missing latents once into validated *_sd.npz files; each batch then reads its own from them (memory does not grow with the dataset)")
    dataloader_workers: int = setting(0, "DataLoader worker processes", flags=("--max_data_loader_n_workers",))
    persistent_data_loader_workers: bool = setting(False, "kohya's flag, accepted: here the workers start with each epoch's loader")
    # kohya's dataset flags: the dataset without a TOML (--train_data_dir), and the lowest fallback of every TOML key
    reg_data_dir: str = setting("", "kohya's regularisation images folder (they train like the others: PFG has no prior loss)")
    in_json: str = setting("", "kohya's fine-tuning metadata JSON for --train_data_dir (as merge_captions_to_metadata.py writes it)")
    dataset_repeats: int | None = setting(None, "num_repeats of every subset without one")
    caption_extension: str | None = setting(None, "caption file extension", default_note=".caption")
    enable_bucket: bool | None = setting(None, "aspect-ratio bucketing")
    min_bucket_reso: int | None = setting(None, "smallest bucket side", default_note="256")
    max_bucket_reso: int | None = setting(None, "largest bucket side", default_note="1024")
    bucket_reso_steps: int | None = setting(None, "bucket sides are multiples of this", default_note="64")
    bucket_no_upscale: bool | None = setting(None, "never enlarge an image to fill its bucket")
    shuffle_caption: bool | None = setting(None, "shuffle the caption's tags every step")
    keep_tokens: int | None = setting(None, "leading tags kept in place by the shuffle")
    keep_tokens_separator: str | None = setting(None, "tags before it (and after a second one) stay in place")
    caption_separator: str | None = setting(None, "tag separator", default_note=",")
    secondary_separator: str | None = setting(None, "joins words into one tag; replaced by caption_separator after shuffling")
    caption_prefix: str | None = setting(None, "text put before every caption")
    caption_suffix: str | None = setting(None, "text put after every caption")
    enable_wildcard: bool | None = setting(None, "{a|b} picks one option per step; a multi-line caption file picks one line")
    caption_dropout_rate: float | None = setting(None, "probability of an empty caption")
    caption_dropout_every_n_epochs: int | None = setting(None, "every N-th epoch trains with empty captions")
    caption_tag_dropout_rate: float | None = setting(None, "probability of dropping each shuffled tag")
    token_warmup_min: int | None = setting(None, "tags used at step 0 of the token warmup", default_note="1")
    token_warmup_step: float | None = setting(None, "step (or fraction of the run, below 1) at which all tags are used")
    flip_aug: bool | None = setting(None, "mirror images at random")
    color_aug: bool | None = setting(None, "random hue or gamma shift (kohya's)")
    random_crop: bool | None = setting(None, "random instead of centred bucket crop")
    resize_interpolation: str | None = setting(None, "lanczos, nearest, bilinear, bicubic, area or box", default_note="lanczos")
    alpha_mask: bool | None = setting(None, "the images' alpha channel weighs the loss (kohya's alpha_mask)")
    # outputs
    save_model_as: str = setting("safetensors", "full UNet output: single-file safetensors/ckpt, or a diffusers folder", choices=("safetensors", "ckpt", "diffusers"))
    save_precision: str = setting("float", "dtype of saved weights", choices=("float", "fp16", "bf16"))
    save_pfg_pt: bool = setting(False, "also write NAME-pfg.pt for loaders that only read .pt")
    save_every_n_steps: int = setting(0, "save every N steps (0 = only at the end)")
    save_every_n_epochs: int = setting(0, "save every N epochs (0 = off)")
    save_last_n: int = setting(0, "keep only the last N intermediate saves (0 = keep all)", flags=("--save_last_n_epochs",))
    save_state: bool = setting(False, "also save the accelerate training state (for --resume)")
    resume: str = setting("", "a NAME-state folder to continue from, or latest: the newest complete state of --output_dir/--output_name")
    # interruptions: a signal saves and stops; a full disk is said, not a traceback
    save_on_signal_timeout: float = setting(0.0, "seconds of grace your platform gives after SIGTERM (spot instances, SLURM); a save that takes longer is reported (0 = unknown)")
    continue_on_save_error: bool = setting(False, "when a periodic save fails (full disk, read-only folder), say so and go on, saving again at the next save point")
    ddp_timeout: int = setting(0, "minutes a process waits for the others in a collective before the run stops (0 = torch's default, 30)")
    logging_dir: str = setting("", "tensorboard log folder")
    log_with: str = setting("", "tensorboard or wandb (default: tensorboard when --logging_dir is set)", choices=("", "tensorboard", "wandb", "all"))
    # validation on held-out images (same metric as eval_pfg.py)
    validation_split: float = setting(0.0, "fraction of each subset's images held out for validation (0 = none); the dataset TOML's validation_split wins")
    validation_seed: int | None = setting(None, "seed of the validation split (default: --seed); the dataset TOML's validation_seed wins")
    validation_every_n_steps: int = setting(0, "validate every N steps (always at the end when --validation_split is set)")
    validation_timesteps: int = setting(4, "fixed timesteps, spread over the schedule, of the validation loss")
    validation_candidates: int = setting(8, "vectors compared per held-out image (its own + K-1 others) for retrieval")
    # sample images during training
    sample_prompts: str = setting("", "prompt file rendered during training: kohya's .txt lines (--i guide images), .toml or .json")
    sample_at_first: bool = setting(False, "also render the sample prompts before the first step")
    sample_every_n_steps: int = setting(0, "render the sample prompts every N steps")
    sample_every_n_epochs: int = setting(0, "render the sample prompts every N epochs")
    sample_sampler: str = setting("euler_a", "sampler of the training samples: gen_pfg.py --sampler names, or kohya's (k_euler_a, dpmsolver++, ...)")

    FLAG_HINTS = FLAG_HINTS

    @classmethod
    def combine_given(cls, values: dict) -> dict:
        """kohya's spellings folded into ours: --network_module networks.lora is --train_unet lora,
        --network_args conv_dim/conv_alpha are the conv LoRA's rank and alpha, --unet_lr is the
        UNet/LoRA rate. `values` holds only what the command line and --config_file gave."""
        values = dict(values)
        module = values.get("network_module")
        if module:
            if module not in LORA_MODULES:
                raise UserError(f"--network_module {module}: PFG trains kohya's LoRA only (--network_module networks.lora, "
                                "which is --train_unet lora)")
            if values.get("train_unet", "lora") != "lora":
                raise UserError(f"--network_module {module} trains a LoRA, but --train_unet is {values['train_unet']!r}; give one of them")
            values["train_unet"] = "lora"
        for argument in values.get("network_args", []):
            key, sep, text = argument.partition("=")
            target = {"conv_dim": ("network_conv_dim", int), "conv_alpha": ("network_conv_alpha", float)}.get(key.strip())
            if not sep or target is None:
                raise UserError(f"--network_args {argument!r}: only conv_dim=N and conv_alpha=A apply to PFG's LoRA "
                                "(the same as --network_conv_dim and --network_conv_alpha)")
            name, kind = target
            try:
                values[name] = kind(text.strip())
            except ValueError:
                raise UserError(f"--network_args {argument!r}: {key.strip()} needs a number") from None
        if values.get("unet_lr") is not None:
            values["learning_rate"] = values["unet_lr"]
        return values

    def notes(self) -> list[str]:
        """What the accepted-but-inert kohya flags of this run do here, said once at the start."""
        notes = []
        if self.v2:
            notes.append("--v2: the model family (SD1, SD2 or SDXL) is read from the model itself; the flag changes nothing")
        if self.network_train_unet_only:
            notes.append("--network_train_unet_only: PFG trains no text encoder anyway; the flag changes nothing")
        if self.persistent_data_loader_workers:
            notes.append("--persistent_data_loader_workers: each epoch's loader starts its own workers here")
        return notes

    @property
    def trained_precision(self) -> str:
        """The dtype of the trained weights: fp32, or bf16/fp16 with --full_bf16/--full_fp16."""
        return "bf16" if self.full_bf16 else "fp16" if self.full_fp16 else "fp32"

    @property
    def attention(self) -> str:
        return "xformers" if self.xformers else "sdpa"

    @property
    def resolution_wh(self) -> tuple[int, int]:
        from library.data.dataset_schema import parse_resolution  # the dataset's own parser: one rule for --resolution

        try:
            return parse_resolution(self.resolution)
        except ValueError as e:
            raise UserError(f"--resolution: {e}") from None

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
        if self.sample_prompts and not (self.sample_every_n_steps or self.sample_every_n_epochs or self.sample_at_first):
            raise UserError("--sample_prompts needs --sample_every_n_steps, --sample_every_n_epochs or --sample_at_first")
        if self.sample_at_first and not self.sample_prompts:
            raise UserError("--sample_at_first needs --sample_prompts")
        if self.log_with in ("tensorboard", "all") and not self.logging_dir:
            raise UserError(f"--log_with {self.log_with} needs --logging_dir")
        if self.save_on_signal_timeout < 0 or self.ddp_timeout < 0:
            raise UserError("--save_on_signal_timeout and --ddp_timeout must be 0 or more")
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise UserError("--full_bf16 needs --mixed_precision bf16")
        if self.full_fp16 and self.mixed_precision != "fp16":
            raise UserError("--full_fp16 needs --mixed_precision fp16")
        if self.validation_seed is not None and self.validation_seed < 0:
            raise UserError(f"--validation_seed must be 0 or more, got {self.validation_seed}")
        self.resolution_wh  # noqa: B018 - validates the string
        self._validate_optimizer()
        self._validate_resume()

    def _validate_optimizer(self) -> None:
        """The class resolves (packages installed, dotted path imports) and takes these arguments."""
        from library.train.optim import check_optimizer

        check_optimizer(self.optimizer_type, self.optimizer_args)

    def _validate_resume(self) -> None:
        """An explicit --resume folder must be a complete state; `latest` is looked up when the run
        starts (library/train/state.py), after what an interrupted save left is tidied up."""
        if self.resume and self.resume != LATEST:
            check_state(Path(self.resume))
