"""Generation retrieval: generate from every held-out guide through the sampler gen_pfg.py uses,
encode the results and ask whether each is nearest its own guide (CLIP-I style, per encoder)."""
from __future__ import annotations

import torch

from library.data.images import load_image
from library.evaluation.metrics import generation_retrieval
from library.sample.sampler import Guide, PFGSampler, SampleRequest, canonical_sampler


def generation_metrics(settings, model, adapter, encoder, second, prompt_encoder, items, features, device, dtype):
    """Generate --images_per_guide images per held-out guide (image j of guide i: seed + i * n + j)
    and compare each with every guide."""
    sampler = PFGSampler(model, adapter, encoder, prompt_encoder, settings.uncond, device, dtype)
    per_guide = settings.images_per_guide
    generated = []  # one list of images per guide
    sizes = []
    for i, item in enumerate(items):
        request = sampler.sized(SampleRequest(
            prompt=settings.prompt, negative_prompt=settings.negative_prompt, width=settings.W, height=settings.H,
            steps=settings.steps, scale=settings.scale, seed=settings.seed + i * per_guide, sampler=canonical_sampler(settings.sampler),
            pfg_scale=settings.pfg_scale, guides=(Guide(str(item.image_path)),),
        ))
        sizes.append(f"{request.width}x{request.height}")
        generated.append([image for image, _ in sampler.generate(request, per_guide)])
    flat = [image for images in generated for image in images]
    owners = torch.arange(len(items)).repeat_interleave(per_guide)
    report = {
        "prompt": settings.prompt, "sizes": sizes, "steps": settings.steps,
        "scale": settings.scale, "sampler": settings.sampler, "images_per_guide": per_guide,
        "encoder": generation_retrieval(torch.from_numpy(encoder.encode(flat)), features, owners).as_dict(),
        "second_encoder": None,
    }
    if second is not None:
        guides = torch.from_numpy(second.encode([load_image(item.image_path) for item in items]))
        report["second_encoder"] = {"id": second.encoder_id, **generation_retrieval(torch.from_numpy(second.encode(flat)), guides, owners).as_dict()}
    return report, generated
