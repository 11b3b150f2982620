"""Generation retrieval: generate from every held-out guide through the sampler gen_pfg.py uses,
encode the results and ask whether each is nearest its own guide (CLIP-I style, per encoder)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from library.data.images import load_image
from library.evaluation.metrics import SimilarityReport, generation_retrieval
from library.sample.sampler import Guide, PFGSampler, SampleRequest, canonical_sampler


@dataclass(frozen=True)
class GenerationReport:
    sizes: list[str]  # WxH per guide
    generated: list[list]  # the images of each guide, in guide order
    seeds: list[list[int]]  # and their seeds
    retrieval: SimilarityReport  # in the space of the PFG head's encoder (--tagger_model)
    encoder_id: str
    second: SimilarityReport | None = None  # in the space of --second_encoder
    second_id: str = ""


def generation_metrics(settings, model, adapter, encoder, second, prompt_encoder, items, features, device, dtype) -> GenerationReport:
    """Generate --images_per_guide images per held-out guide (image j of guide i: seed + i * n + j)
    and compare each with every guide, in the encoder's space and in the second encoder's."""
    sampler = PFGSampler(model, adapter, encoder, prompt_encoder, settings.uncond, device, dtype)
    per_guide = settings.images_per_guide
    generated, seeds, sizes = [], [], []  # one list of images (and seeds) per guide
    for i, item in enumerate(items):
        request = sampler.sized(SampleRequest(
            prompt=settings.prompt, negative_prompt=settings.negative_prompt, width=settings.W, height=settings.H,
            steps=settings.steps, scale=settings.scale, seed=settings.seed + i * per_guide, sampler=canonical_sampler(settings.sampler),
            pfg_scale=settings.pfg_scale, guides=(Guide(str(item.image_path)),),
        ))
        sizes.append(f"{request.width}x{request.height}")
        pairs = sampler.generate(request, per_guide)
        generated.append([image for image, _ in pairs])
        seeds.append([seed for _, seed in pairs])
    flat = [image for images in generated for image in images]
    owners = torch.arange(len(items)).repeat_interleave(per_guide)
    retrieval = generation_retrieval(torch.from_numpy(encoder.encode(flat)), features, owners)
    if second is None:
        return GenerationReport(sizes, generated, seeds, retrieval, encoder.encoder_id)
    guides = torch.from_numpy(second.encode([load_image(item.image_path) for item in items]))
    in_second = generation_retrieval(torch.from_numpy(second.encode(flat)), guides, owners)
    return GenerationReport(sizes, generated, seeds, retrieval, encoder.encoder_id, in_second, second.encoder_id)
