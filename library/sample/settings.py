"""Every gen_pfg.py option, typed (the part eval_pfg.py shares in ModelSettings). The command line
and `--config_file` both fill these."""
from __future__ import annotations

from dataclasses import dataclass

from library.cli_config import setting
from library.errors import UserError
from library.sample.sampler import SAMPLER_ALIASES, SAMPLERS, Guide


@dataclass(frozen=True)
class ModelSettings:
    """What gen_pfg.py and eval_pfg.py share: the model under use, its PFG head, LoRAs and image
    encoder, and how an image is generated from a guide."""

    pretrained_model_name_or_path: str = setting("", "SD1.x/SD2.x/SDXL diffusers folder, single-file checkpoint or hub id")
    vae: str = setting("", "replace the model's VAE: a single-file VAE or a diffusers VAE folder")
    v_parameterization: bool | None = setting(None, "the model predicts v (needed for v-models given as single files without metadata); --no-v_parameterization forces epsilon")
    pfg_weights: str = setting("", "NAME-pfg.safetensors, or an original .pt PFG file")
    tagger_model: str = setting("", "the image encoder the PFG head was trained with: WD tagger folder, .onnx, CLIP folder or hub id")
    feature_tensor: str = setting("", "name of the pooled-vector tensor inside the tagger graph (found automatically if empty)")
    network_weights: list[str] = setting([], "LoRA files (ours or any kohya LoRA), repeatable")
    network_mul: list[float] = setting([], "strength per LoRA file (default 1.0 each)")
    pfg_scale: float = setting(1.0, "tokens = pfg_scale * PFG(feature); 0 disables PFG")
    uncond: str = setting("zeros", "padding of the unconditional branch", choices=("zeros", "eos"))
    prompt: str = setting("illustration of *", "prompt (A1111 weighting syntax)")
    negative_prompt: str = setting("", "negative prompt")
    clip_skip: int = setting(1, "use the k-th last text encoder layer (2 = penultimate)")
    W: int = setting(0, "image width (multiple of 8); 0 = from the model: its native size, or the bucket nearest the guide/init image's aspect ratio (SDXL: 1024x1024, 832x1216, ...)")
    H: int = setting(0, "image height (multiple of 8); 0 = from the model, as for --W")
    steps: int = setting(28, "sampling steps")
    scale: float = setting(7.0, "CFG scale")
    sampler: str = setting("euler_a", "sampler (kohya's names such as k_euler_a work too)", choices=(*SAMPLERS, *SAMPLER_ALIASES))
    device: str = setting("", "cuda or cpu (default: cuda when available)")
    dtype: str = setting("fp32", "model dtype", choices=("fp32", "fp16", "bf16"))

    def validate_model(self) -> None:
        if not self.pretrained_model_name_or_path:
            raise UserError("--pretrained_model_name_or_path is required")
        for name, value in (("--W", self.W), ("--H", self.H)):
            if value < 0 or value % 8:
                lower, upper = max(8, value // 8 * 8), (value // 8 + 1) * 8
                raise UserError(f"{name} {value} is not a positive multiple of 8 (the VAE works in 8-pixel cells); try {lower} or {upper}")
        if self.network_mul and len(self.network_mul) != len(self.network_weights):
            raise UserError(f"--network_mul has {len(self.network_mul)} values for {len(self.network_weights)} --network_weights files")


@dataclass(frozen=True)
class GenSettings(ModelSettings):
    image: list[str] = setting([], "guide image PATH[:WEIGHT], repeatable; vectors are averaged by weight; with --from_file, the guide of the lines without their own --i")
    negative_image: list[str] = setting([], "guide image whose tokens replace the padding of the unconditional branch")
    features: list[str] = setting([], "precomputed *_pfg.npz vector files used as guides (no tagger needed), PATH[:WEIGHT]")
    from_file: str = setting("", "prompt file, one image request per prompt: kohya's .txt lines (--n --w --h --d --s --l --ss, our --i --ni --ps), .toml or .json")
    seed: int = setting(-1, "seed of the first image (-1: random); image k uses seed + k")
    images_per_prompt: int = setting(1, "images per prompt")
    batch_size: int = setting(1, "images generated together")
    init_image: str = setting("", "img2img: start from this image")
    strength: float = setting(0.75, "img2img denoising strength")
    outdir: str = setting("outputs", "output folder: NNNNN-SEED.png, NNNNN counting on from the highest number already there (reruns never overwrite)")
    grid: bool = setting(False, "also write grid-NNNNN.png: one row per prompt, its guide image beside its results, labelled with the prompt, guide names and seeds")
    sdpa: bool = setting(False, "torch scaled-dot-product attention", default_note="used unless --xformers")
    xformers: bool = setting(False, "xformers attention (CUDA only, optional install)")
    vae_slicing: bool = setting(False, "decode one image at a time (less memory)")
    vae_tiling: bool = setting(False, "decode in tiles (large sizes)")

    def validate(self) -> None:
        self.validate_model()
        if self.sdpa and self.xformers:
            raise UserError("--sdpa and --xformers exclude each other")
        guides = [*self.image, *self.negative_image, *self.features]
        if guides and not self.pfg_weights:
            flags = [f for f, v in (("--image", self.image), ("--negative_image", self.negative_image), ("--features", self.features)) if v]
            verb = "needs" if len(flags) == 1 else "need"
            raise UserError(f"{' and '.join(flags)} {verb} --pfg_weights (the PFG head that turns guide vectors into tokens)")
        if not self.tagger_model and any(not _is_vector_file(p) for p in [*self.image, *self.negative_image]):
            raise UserError("--image and --negative_image need --tagger_model to turn a guide image into a vector (or pass a *_pfg.npz with --features)")
        if self.images_per_prompt < 1 or self.batch_size < 1:
            raise UserError("--images_per_prompt and --batch_size must be at least 1")


def _is_vector_file(guide: str) -> bool:
    return Guide.parse(guide).path.endswith(".npz")
