"""Image generation with PFG: one code path for gen_pfg.py and training samples.

The diffusers pipeline does the sampling; we hand it prompt embeddings with the PFG tokens
already appended (conditional branch) and the unconditional padding or a negative guide's tokens
(negative branch), both of the same length. `pfg_scale == 0` appends nothing, so the result
equals the plain pipeline with the same seed, pixel for pixel (tests/test_gen.py checks it).
The `parameters` text chunk follows A1111's layout so webui tools read our PNGs.

SDXL runs through StableDiffusionXLPipeline the same way, with the pooled bigG embeddings beside
(plus the PFG head's pooled output when it has one, `--pfg_pooled`) and the pipeline's default
time ids (uncropped, original size = target size = the requested size).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.errors import UserError
from library.models.loading import SDModel
from library.models.pfg import PFGAdapter, append_tokens, combine_features, uncond_tokens
from library.models.text import PromptEncoder

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
    "deis": ("DEISMultistepScheduler", {}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
# kohya's sample-prompt names (`--ss k_euler_a`), so its prompt files render unchanged. diffusers
# deprecates the first-order "dpmsolver" algorithm; its name maps to the DPM++ 2M successor.
SAMPLER_ALIASES = {
    "k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a",
    "dpmsolver++": "dpm++2m", "dpmsolver": "dpm++2m", "plms": "pndm",
}
# The names A1111 writes in its `parameters` text, so the PNG reads like a webui image.
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "heun": "Heun", "euler": "Euler", "euler_a": "Euler a",
    "dpm++2m": "DPM++ 2M", "dpm++2m_karras": "DPM++ 2M Karras", "dpm++2m_sde": "DPM++ 2M SDE",
    "dpm++2m_sde_karras": "DPM++ 2M SDE Karras", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a", "unipc": "UniPC",
    "deis": "DEIS", "dpmsingle": "DPM Solver single",
}


def canonical_sampler(name: str) -> str:
    """Our sampler name for `name`, accepting kohya's aliases and any letter case."""
    name = name.strip().lower()
    return SAMPLER_ALIASES.get(name, name)


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
        if self.width % 8 or self.height % 8 or self.width < 0 or self.height < 0:  # 0: left to the model
            raise UserError(f"{where}width and height must be positive multiples of 8, got {self.width}x{self.height}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"{where}unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise UserError(f"{where}steps must be at least 1, got {self.steps}")
        if not 0.0 < self.strength <= 1.0:
            raise UserError(f"{where}strength must be within (0, 1], got {self.strength}")
        if self.init_image and int(self.steps * self.strength) < 1:
            raise UserError(
                f"{where}img2img runs steps x strength = {self.steps} x {self.strength:g} < 1 denoising steps; "
                "raise the steps or the strength"
            )


def make_scheduler(sampler: str, scheduler_config: dict):
    import diffusers

    class_name, extra = SAMPLERS[sampler]
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    # Latents are not bounded to [-1, 1]: DDIM/DDPM's default x0 clipping would distort them.
    config["clip_sample"] = False
    try:
        return getattr(diffusers, class_name).from_config({**config, **extra})
    except ImportError as e:  # e.g. LMS needs scipy: a partial install names the missing package
        detail = " ".join(str(e).split())
        raise UserError(f"--sampler {sampler} is unavailable here: {detail}") from None


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
        self.prompt_encoder = prompt_encoder or model.prompt_encoder()
        self.uncond = uncond
        self.device = torch.device(device)
        self.dtype = dtype
        self._feature_cache: dict[str, torch.Tensor] = {}
        self._pipelines: dict[bool, object] = {}
        self._encoded: tuple[tuple, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    # -- conditioning -------------------------------------------------------------------------

    def feature_of(self, path: str) -> torch.Tensor:
        """The vector of one guide: an image through the encoder, or a `_pfg.npz` file."""
        if path not in self._feature_cache:
            if path.endswith(".npz"):
                from library.data.features import read_feature

                vector = read_feature(path)
            else:
                if self.encoder is None:
                    raise UserError(f"guide image {path} needs an image encoder: pass --tagger_model")
                from library.data.images import ImageLoadError, load_image

                try:
                    image = load_image(path)
                except ImageLoadError as e:
                    raise UserError(str(e)) from None
                vector = self.encoder.encode([image])[0]
            vector = torch.from_numpy(np.asarray(vector, dtype=np.float32))
            expected = self.adapter.shape.input_dim if self.adapter is not None else None
            if expected is not None and vector.shape[-1] != expected:
                raise UserError(
                    f"{path}: the guide vector has width D={vector.shape[-1]} but the PFG head expects D={expected} "
                    "(made with a different image encoder?)"
                )
            self._feature_cache[path] = vector
        return self._feature_cache[path]

    def pfg_tokens(self, guides: tuple[Guide, ...], scale: float) -> torch.Tensor | None:
        if not guides or self.adapter is None or scale == 0:
            return None
        feature = combine_features([self.feature_of(g.path) for g in guides], [g.weight for g in guides])
        with torch.no_grad():
            return self.adapter(feature[None], scale)

    @torch.no_grad()
    def embeddings(self, request: SampleRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) UNet contexts of equal length, batch 1.

        Guide tokens go on the conditional branch, negative-guide tokens on the unconditional
        one; a branch without its own tokens gets the `--uncond` padding so the lengths match.
        """
        states, _ = self._encode_prompts(request)
        cond_text, uncond_text = states[:1], states[1:]
        tokens = self.pfg_tokens(request.guides, request.pfg_scale)
        negative = self.pfg_tokens(request.negative_guides, request.pfg_scale)
        if tokens is None and negative is None:
            return cond_text, uncond_text
        num_tokens = self.adapter.shape.num_tokens
        if tokens is None:
            tokens = uncond_tokens(self.uncond, cond_text, num_tokens)
        if negative is None:
            negative = uncond_tokens(self.uncond, uncond_text, num_tokens)
        return append_tokens(cond_text, tokens), append_tokens(uncond_text, negative)

    def _encode_prompts(self, request: SampleRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """States (and SDXL's pooled vectors) of [prompt, negative prompt], remembered for the
        last pair so SDXL's two uses of one request encode once."""
        prompts = (request.prompt, request.negative_prompt)
        if self._encoded is None or self._encoded[0] != prompts:
            chunks = self.prompt_encoder.chunks_needed(list(prompts), weighted=True)
            if self.prompt_encoder.has_pooled:
                # One prompt at a time, as SDXL pipelines do: a batched projection rounds differently.
                parts = [self.prompt_encoder.encode_pooled([p], weighted=True, num_chunks=chunks) for p in prompts]
                encoded = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            else:
                encoded = (self.prompt_encoder.encode(list(prompts), weighted=True, num_chunks=chunks), None)
            self._encoded = (prompts, encoded)
        return self._encoded[1]

    @torch.no_grad()
    def pooled_embeddings(self, request: SampleRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: (conditional, unconditional) pooled text embeddings, batch 1, each plus the PFG
        head's pooled output of its guides when the head has one (`--pfg_pooled`)."""
        _, pooled = self._encode_prompts(request)
        cond, uncond = pooled[:1], pooled[1:]
        pooled_dim = self.adapter.shape.pooled_dim if self.adapter is not None else 0
        if pooled_dim and request.pfg_scale != 0:
            for guides, index in ((request.guides, 0), (request.negative_guides, 1)):
                if guides:
                    feature = combine_features([self.feature_of(g.path) for g in guides], [g.weight for g in guides])
                    extra = self.adapter.pooled(feature[None], request.pfg_scale).to(pooled)
                    cond, uncond = (cond + extra, uncond) if index == 0 else (cond, uncond + extra)
        return cond, uncond

    # -- sampling -----------------------------------------------------------------------------

    def _pipeline(self, sampler: str, img2img: bool):
        """The diffusers pipeline around our modules, built once per mode; only the scheduler
        (stateful, cheap) is made fresh for every call."""
        if img2img not in self._pipelines:
            pipe = self.model.family.pipeline(self.model, make_scheduler(sampler, self.model.scheduler_config), img2img)
            pipe.set_progress_bar_config(disable=True)
            self._pipelines[img2img] = pipe
        pipe = self._pipelines[img2img]
        pipe.scheduler = make_scheduler(sampler, self.model.scheduler_config)
        return pipe

    @torch.no_grad()
    def sized(self, request: SampleRequest) -> SampleRequest:
        """The request with a width or height of 0 chosen from the model (see `generation_size`):
        the init image's shape, else the first guide image's, picks the bucket."""
        if request.width and request.height:
            return request
        from library.data.buckets import generation_size
        from library.data.images import ImageLoadError, load_image

        native = int(self.model.unet.config.sample_size) * self.model.vae_scale_factor
        shaped_like = request.init_image or next((g.path for g in request.guides if not g.path.endswith(".npz")), "")
        try:
            reference = load_image(shaped_like).size if shaped_like else None
        except ImageLoadError as e:
            raise UserError(str(e)) from None
        width, height = generation_size(request.width, request.height, native, reference)
        return replace(request, width=width, height=height)

    def generate(self, request: SampleRequest, count: int = 1) -> list[tuple[Image.Image, int]]:
        """`count` images with seeds seed, seed+1, ...: each image is reproducible on its own.

        Every image draws its noise from its own CPU generator (what diffusers does with a list
        of generators), so image k of a batch equals seed+k generated alone, on any device.
        """
        request = self.sized(request)
        request.validate()
        cond, uncond = self.embeddings(request)
        seeds = [request.seed + i for i in range(count)]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        pipe = self._pipeline(request.sampler, bool(request.init_image))
        kwargs = dict(
            prompt_embeds=cond.expand(count, -1, -1).to(self.device, self.dtype),
            negative_prompt_embeds=uncond.expand(count, -1, -1).to(self.device, self.dtype),
            num_inference_steps=request.steps,
            guidance_scale=request.scale,
            generator=generators,
        )
        if self.prompt_encoder.has_pooled:  # SDXL: the pooled text embeddings go beside
            cond_pooled, uncond_pooled = self.pooled_embeddings(request)
            kwargs["pooled_prompt_embeds"] = cond_pooled.expand(count, -1).to(self.device, self.dtype)
            kwargs["negative_pooled_prompt_embeds"] = uncond_pooled.expand(count, -1).to(self.device, self.dtype)
        if request.init_image:
            from library.data.images import ImageLoadError, load_image

            try:
                init = load_image(request.init_image).resize((request.width, request.height), Image.Resampling.LANCZOS)
            except ImageLoadError as e:
                raise UserError(str(e)) from None
            arrays = pipe(image=[init] * count, strength=request.strength, output_type="np", **kwargs).images
        else:
            arrays = pipe(width=request.width, height=request.height, output_type="np", **kwargs).images
        for array, seed in zip(arrays, seeds):
            if not np.isfinite(array).all():  # would be saved as a black image without a word
                print(f"warning: the image of seed {seed} has NaN/inf pixels (the model overflowed in {_dtype_name(self.dtype)}); "
                      "use --dtype bf16 or fp32" + (", or an fp16-safe --vae" if self.model.family.vae_overflows_in_fp16 else ""))
        return list(zip(pipe.numpy_to_pil(arrays), seeds))  # the pipeline's own conversion to PIL


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _quote(value: object) -> str:
    """A1111 quotes a field value (JSON string) when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _guide_list(guides: tuple[Guide, ...]) -> str:
    return "; ".join(f"{Path(g.path).name}:{g.weight:g}" for g in guides)


def a1111_parameters(
    request: SampleRequest, seed: int, model_name: str, pfg_name: str, clip_skip: int = 1, uncond: str = "zeros"
) -> str:
    """The `parameters` text A1111 writes into its PNGs, with PFG's settings appended:
    prompt, `Negative prompt: ...`, then one line of `Key: value` fields."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    fields: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": A1111_SAMPLER_NAMES.get(request.sampler, request.sampler),
        "CFG scale": f"{request.scale:g}",
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model_name,
    }
    if clip_skip > 1:
        fields["Clip skip"] = clip_skip
    if request.init_image:
        fields["Denoising strength"] = f"{request.strength:g}"
        fields["Init image"] = Path(request.init_image).name
    if pfg_name and (request.guides or request.negative_guides):
        fields["PFG"] = pfg_name
        if request.guides:
            fields["PFG images"] = _guide_list(request.guides)
        if request.negative_guides:
            fields["PFG negative images"] = _guide_list(request.negative_guides)
        fields["PFG scale"] = f"{request.pfg_scale:g}"
        fields["PFG uncond"] = uncond
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


# A1111's field pattern: `Key: value` or `Key: "quoted, value"`, separated by commas.
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Read back the `parameters` text: `prompt`, `negative_prompt` and every `Key: value`
    field (unquoted). Multi-line prompts are kept; the last line holds the fields."""
    *lines, last = text.strip("\n").split("\n")
    if len(_FIELD.findall(last)) < 3:  # no field line: the whole text is prompt
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:") and not negative:
            negative.append(line[len("Negative prompt:"):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    result = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in _FIELD.findall(last):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = json.loads(value)
        result[key.strip()] = value
    return result
