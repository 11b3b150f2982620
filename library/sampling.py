"""Image generation with PFG: one code path for gen_pfg.py and training samples.

The diffusers pipeline does the sampling; we hand it prompt embeddings with the PFG tokens
already appended (conditional branch) and the unconditional padding (negative branch), both of
the same length. `pfg_scale == 0` appends nothing, so the result equals the plain pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.errors import UserError
from library.models import SDModel
from library.pfg import PFGAdapter, append_tokens, combine_features, uncond_tokens
from library.text import PromptEncoder

# --sampler name -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# The names A1111 writes in its `parameters` text, so the PNG reads like a webui image.
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "heun": "Heun", "euler": "Euler", "euler_a": "Euler a",
    "dpm++2m": "DPM++ 2M", "dpm++2m_karras": "DPM++ 2M Karras", "dpm++2m_sde": "DPM++ 2M SDE",
    "dpm++2m_sde_karras": "DPM++ 2M SDE Karras", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a", "unipc": "UniPC",
}


@dataclass(frozen=True)
class Guide:
    """A guide image (`path:weight`) or a precomputed vector file (`--features FILE.npz`)."""

    path: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Guide":
        """`guide.png` or `guide.png:0.5` (a Windows drive letter is not a weight)."""
        head, sep, tail = text.rpartition(":")
        if sep and head and not (len(head) == 1 and head.isalpha()):
            try:
                return cls(head, float(tail))
            except ValueError:
                pass
        return cls(text, 1.0)


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 28
    scale: float = 7.0
    seed: int = 0
    sampler: str = "euler_a"
    pfg_scale: float = 1.0
    guides: tuple[Guide, ...] = ()
    negative_guides: tuple[Guide, ...] = ()
    init_image: str = ""
    strength: float = 0.75
    extra: dict = field(default_factory=dict, compare=False)

    def validate(self, source: str = "") -> None:
        where = f"{source}: " if source else ""
        if self.width % 8 or self.height % 8 or self.width <= 0 or self.height <= 0:
            raise UserError(f"{where}width and height must be positive multiples of 8, got {self.width}x{self.height}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"{where}unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise UserError(f"{where}steps must be at least 1, got {self.steps}")
        if not 0.0 < self.strength <= 1.0:
            raise UserError(f"{where}strength must be within (0, 1], got {self.strength}")


def make_scheduler(sampler: str, scheduler_config: dict):
    import diffusers

    class_name, extra = SAMPLERS[sampler]
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    # Latents are not bounded to [-1, 1]: DDIM/DDPM's default x0 clipping would distort them.
    config["clip_sample"] = False
    return getattr(diffusers, class_name).from_config({**config, **extra})


class PFGSampler:
    """Turns SampleRequests into images with one model, one PFG head and one encoder."""

    def __init__(
        self,
        model: SDModel,
        adapter: PFGAdapter | None,
        encoder=None,
        prompt_encoder: PromptEncoder | None = None,
        uncond: str = "zeros",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.model = model
        self.adapter = adapter
        self.encoder = encoder
        self.prompt_encoder = prompt_encoder or PromptEncoder(model.tokenizer, model.text_encoder)
        self.uncond = uncond
        self.device = torch.device(device)
        self.dtype = dtype
        self._feature_cache: dict[str, torch.Tensor] = {}

    # -- conditioning -------------------------------------------------------------------------

    def feature_of(self, path: str) -> torch.Tensor:
        """The vector of one guide: an image through the encoder, or a `_pfg.npz` file."""
        if path not in self._feature_cache:
            if path.endswith(".npz"):
                from library.features import read_feature

                vector = read_feature(path)
            else:
                if self.encoder is None:
                    raise UserError(f"guide image {path} needs an image encoder: pass --tagger_model")
                from library.images import ImageLoadError, load_image

                try:
                    image = load_image(path)
                except ImageLoadError as e:
                    raise UserError(str(e)) from None
                vector = self.encoder.encode([image])[0]
            self._feature_cache[path] = torch.from_numpy(np.asarray(vector, dtype=np.float32))
        return self._feature_cache[path]

    def pfg_tokens(self, guides: tuple[Guide, ...], scale: float) -> torch.Tensor | None:
        if not guides or self.adapter is None or scale == 0:
            return None
        feature = combine_features([self.feature_of(g.path) for g in guides], [g.weight for g in guides])
        with torch.no_grad():
            return self.adapter(feature[None], scale)

    @torch.no_grad()
    def embeddings(self, request: SampleRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) UNet contexts of equal length, batch 1."""
        prompts = [request.prompt, request.negative_prompt]
        chunks = self.prompt_encoder.chunks_needed(prompts, weighted=True)
        states = self.prompt_encoder.encode(prompts, weighted=True, num_chunks=chunks)
        cond_text, uncond_text = states[:1], states[1:]
        tokens = self.pfg_tokens(request.guides, request.pfg_scale)
        if tokens is None:
            if request.negative_guides and self.adapter is not None and request.pfg_scale != 0:
                raise UserError("--negative_image needs a guide image (--image) as well")
            return cond_text, uncond_text
        negative = self.pfg_tokens(request.negative_guides, request.pfg_scale)
        if negative is None:
            negative = uncond_tokens(self.uncond, uncond_text, tokens.shape[1])
        return append_tokens(cond_text, tokens), append_tokens(uncond_text, negative)

    # -- sampling -----------------------------------------------------------------------------

    def _pipeline(self, sampler: str, img2img: bool):
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
        pipe = cls(
            vae=self.model.vae, text_encoder=self.model.text_encoder, tokenizer=self.model.tokenizer,
            unet=self.model.unet, scheduler=make_scheduler(sampler, self.model.scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(self, request: SampleRequest, count: int = 1) -> list[tuple[Image.Image, int]]:
        """`count` images with seeds seed, seed+1, ...: each image is reproducible on its own."""
        request.validate()
        cond, uncond = self.embeddings(request)
        seeds = [request.seed + i for i in range(count)]
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        pipe = self._pipeline(request.sampler, bool(request.init_image))
        kwargs = dict(
            prompt_embeds=cond.expand(count, -1, -1).to(self.device, self.dtype),
            negative_prompt_embeds=uncond.expand(count, -1, -1).to(self.device, self.dtype),
            num_inference_steps=request.steps,
            guidance_scale=request.scale,
            generator=generators,
        )
        if request.init_image:
            from library.images import ImageLoadError, load_image

            try:
                init = load_image(request.init_image).resize((request.width, request.height), Image.Resampling.LANCZOS)
            except ImageLoadError as e:
                raise UserError(str(e)) from None
            images = pipe(image=[init] * count, strength=request.strength, **kwargs).images
        else:
            images = pipe(width=request.width, height=request.height, **kwargs).images
        return list(zip(images, seeds))


def with_overrides(request: SampleRequest, **changes) -> SampleRequest:
    return replace(request, **{k: v for k, v in changes.items() if v is not None})


def a1111_parameters(request: SampleRequest, seed: int, model_name: str, pfg_name: str) -> str:
    """The `parameters` text A1111 writes into its PNGs, with PFG's settings appended."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    fields = [
        f"Steps: {request.steps}",
        f"Sampler: {A1111_SAMPLER_NAMES.get(request.sampler, request.sampler)}",
        f"CFG scale: {request.scale:g}",
        f"Seed: {seed}",
        f"Size: {request.width}x{request.height}",
        f"Model: {model_name}",
    ]
    if request.init_image:
        fields.append(f"Denoising strength: {request.strength:g}")
    if pfg_name and request.guides:
        fields += [
            f"PFG: {pfg_name}",
            f"PFG images: {'; '.join(f'{Path(g.path).name}:{g.weight:g}' for g in request.guides)}",
            f"PFG scale: {request.pfg_scale:g}",
        ]
        if request.negative_guides:
            fields.append(f"PFG negative images: {'; '.join(f'{Path(g.path).name}:{g.weight:g}' for g in request.negative_guides)}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Read back the `parameters` text: prompt, negative prompt and the key: value fields."""
    lines = text.split("\n")
    result = {"prompt": lines[0], "negative_prompt": ""}
    rest = lines[1:]
    if rest and rest[0].startswith("Negative prompt: "):
        result["negative_prompt"] = rest[0][len("Negative prompt: "):]
        rest = rest[1:]
    for part in ", ".join(rest).split(", "):
        key, sep, value = part.partition(": ")
        if sep:
            result[key] = value
    return result
