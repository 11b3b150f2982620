"""Measure how strongly a trained PFG model follows its guide image, on held-out images.

    python eval_pfg.py --pretrained_model_name_or_path SD --pfg_weights NAME-pfg.safetensors \
        --tagger_model TAGGER --dataset_config HELDOUT.toml --output_json eval.json \
        [--contact_sheet sheet.png] [--second_encoder CLIP_FOLDER] [--no-generate]

Three numbers (library/evaluation/metrics.py computes them; the trainer's validation uses the same code):
  conditioning gain     denoising loss with other images' vectors minus with the image's own,
                        fixed seeded noise at --num_timesteps timesteps; bootstrap 95% interval
  denoising retrieval   how often the own vector gives the lowest loss among --candidates K
  generation retrieval  generate --images_per_guide images from each guide, encode them; cosine
                        similarity to the own guide vs the others and top-1 retrieval (CLIP-I), per encoder
The recipe: settings -> held-out items -> model, PFG head, encoders -> vectors and latents ->
denoising metrics -> generation -> table, JSON, contact sheet.

JSON keys: model, pfg_weights, encoder, images, seed, denoising {timesteps, candidates,
loss_own, loss_shuffled, gain {mean, low, high, above_zero}, retrieval {top1, chance, ratio}},
generation (null with --no-generate) {prompt, sizes (WxH per guide), steps, scale, sampler, images_per_guide, encoder {own_similarity,
other_similarity, top1, chance, ratio}, second_encoder (same keys, or null)}.
"""
from __future__ import annotations

import sys
from pathlib import Path

from library.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    from library.cli_config import parse_settings
    from library.data.dataset_config import dataset_config_from_settings
    from library.evaluation.settings import EvalSettings

    # 1. Settings and the held-out images: mistakes surface before any model loads.
    settings, _ = parse_settings(EvalSettings, argv, __doc__)
    settings.validate()
    dataset_config = dataset_config_from_settings(settings)
    items = held_out_items(dataset_config, settings)

    import torch

    from library.evaluation.metrics import evaluate_denoising, load_eval_samples
    from library.models.pfg import check_compatible
    from library.models.text_sdxl import make_prompt_encoder
    from library.train.trainer import StepOptions
    from library.train.trainer_sdxl import make_trainer

    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[settings.dtype]

    # 2. The model under test, its PFG head and the encoders.
    model, adapter = load_model_and_head(settings, device, dtype)
    encoder = second = None
    if settings.tagger_model:
        from library.models.image_encoders import load_encoder

        encoder = load_encoder(settings.tagger_model, device=device.type, feature_tensor=settings.feature_tensor or None)
    if settings.second_encoder:
        from library.models.image_encoders import load_encoder

        second = load_encoder(settings.second_encoder, device=device.type)

    # 3. Vectors (valid caches of this encoder, else computed) and latents of the held-out images.
    features = item_features(items, encoder)
    check_compatible(adapter, settings.pfg_weights, features.shape[1], model.cross_attention_dim)
    samples = load_eval_samples(items, features, model.vae)
    prompt_encoder = make_prompt_encoder(model, clip_skip=settings.clip_skip)

    # 4. Conditioning gain and denoising retrieval.
    trainer = make_trainer(model, adapter, prompt_encoder, StepOptions(uncond=settings.uncond))
    denoising = evaluate_denoising(trainer, samples, settings.num_timesteps, settings.candidates, settings.seed, settings.n_boot)

    # 5. Generation retrieval, through the sampler gen_pfg.py uses.
    generation, generated = None, []
    if settings.generate:
        generation, generated = generation_metrics(settings, model, adapter, encoder, second, prompt_encoder, items, features, device, dtype)

    result = {
        "model": settings.pretrained_model_name_or_path,
        "pfg_weights": settings.pfg_weights,
        "encoder": encoder.encoder_id if encoder else None,
        "images": [item.image_path.name for item in items],
        "seed": settings.seed,
        "denoising": denoising.as_dict(),
        "generation": generation,
    }
    print(format_table(result))
    write_outputs(settings, result, items, generated)
    return 0


def held_out_items(dataset_config, settings) -> list:
    from library.data.dataset import collect_items

    items, failures = collect_items(dataset_config, settings.pfg_prompt)
    for failure in failures:
        print(f"skipped {failure.path}: {failure.reason}")
    if settings.num_images:
        items = items[: settings.num_images]
    if len(items) < 2:
        raise UserError(f"{dataset_config.source}: {len(items)} usable held-out images; the metrics compare images, so at least 2 are needed")
    return items


def load_model_and_head(settings, device, dtype):
    """The SD model (+VAE override, +LoRA) and the PFG head, as gen_pfg.py loads them."""
    from library.models.loading import load_for_inference
    from library.models.pfg import load_pfg

    model = load_for_inference(
        settings.pretrained_model_name_or_path, v_prediction=settings.v_parameterization, vae=settings.vae,
        lora_files=settings.network_weights, lora_multipliers=settings.network_mul, device=device, dtype=dtype,
    )
    adapter, _ = load_pfg(settings.pfg_weights, model.cross_attention_dim)
    adapter.to(device, dtype=dtype).eval()
    return model, adapter


def item_features(items: list, encoder):
    """(n, D) vectors: the encoder's valid caches, or the encoder run now; without an encoder,
    the caches prepare_features.py wrote."""
    import numpy as np
    import torch

    from library.data.dataset import load_features
    from library.data.features import load_valid_feature
    from library.data.images import ImageLoadError, load_image

    if encoder is None:
        return load_features(items)
    vectors = []
    for item in items:
        vector = load_valid_feature(item.feature_path, encoder.encoder_id, item.image_path)
        if vector is None:
            try:
                vector = encoder.encode([load_image(item.image_path)])[0]
            except ImageLoadError as e:
                raise UserError(str(e)) from None
        vectors.append(np.asarray(vector, dtype=np.float32))
    return torch.from_numpy(np.stack(vectors))


def generation_metrics(settings, model, adapter, encoder, second, prompt_encoder, items, features, device, dtype):
    """Generate --images_per_guide images per held-out guide (image j of guide i: seed + i * n + j)
    and compare each with every guide."""
    import torch

    from library.evaluation.metrics import generation_retrieval
    from library.data.images import load_image
    from library.sample.sampler import Guide, PFGSampler, SampleRequest

    sampler = PFGSampler(model, adapter, encoder, prompt_encoder, settings.uncond, device, dtype)
    per_guide = settings.images_per_guide
    generated = []  # one list of images per guide
    sizes = []
    for i, item in enumerate(items):
        request = sampler.sized(SampleRequest(
            prompt=settings.prompt, negative_prompt=settings.negative_prompt, width=settings.W, height=settings.H,
            steps=settings.steps, scale=settings.scale, seed=settings.seed + i * per_guide, sampler=settings.sampler,
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


def format_table(result: dict) -> str:
    d = result["denoising"]
    gain, ret = d["gain"], d["retrieval"]
    lines = [
        f"{len(result['images'])} held-out images, {len(d['timesteps'])} timesteps, K = {d['candidates']} candidates, seed {result['seed']}",
        f"{'metric':24s} {'value':>10s}   reference",
        f"{'loss, own vector':24s} {d['loss_own']:10.5f}",
        f"{'loss, other vectors':24s} {d['loss_shuffled']:10.5f}",
        f"{'conditioning gain':24s} {gain['mean']:10.5f}   95% [{gain['low']:.5f}, {gain['high']:.5f}]"
        + ("  above zero" if gain["above_zero"] else "  includes zero or below"),
        f"{'denoising retrieval':24s} {ret['top1']:10.3f}   chance {ret['chance']:.3f} ({ret['ratio']:.1f}x)",
    ]
    generation = result["generation"]
    if generation:
        for key, label in (("encoder", "encoder"), ("second_encoder", "second encoder")):
            g = generation[key]
            if g is None:
                continue
            lines += [
                f"{'generation, ' + label:24s} {g['top1']:10.3f}   chance {g['chance']:.3f} ({g['ratio']:.1f}x)",
                f"{'  cosine own / others':24s} {g['own_similarity']:10.4f}   {g['other_similarity']:.4f}",
            ]
    return "\n".join(lines)


def write_outputs(settings, result: dict, items: list, generated: list) -> None:
    if settings.output_json:
        from library.train.saving import write_json

        write_json(Path(settings.output_json), result)
        print(f"wrote {settings.output_json}")
    if settings.contact_sheet:
        from library.sample.image_outputs import contact_sheet, save_png
        from library.data.images import load_image

        rows = [(load_image(item.image_path), images) for item, images in zip(items, generated)]
        labels = [item.image_path.stem for item in items]
        path = Path(settings.contact_sheet)
        save_png(contact_sheet(rows, cell=160, label_rows=labels), path, "contact sheet: held-out guide image, then what the model generated from it")
        print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
