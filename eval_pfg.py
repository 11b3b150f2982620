"""Measure how strongly a trained PFG model follows its guide image, on held-out images.

    python eval_pfg.py --pretrained_model_name_or_path SD --pfg_weights NAME-pfg.safetensors \
        --tagger_model TAGGER --dataset_config HELDOUT.toml --output_json eval.json \
        [--contact_sheet sheet.png] [--second_encoder CLIP_FOLDER] [--no-generate]

What it prints (each label is a key of eval.json; the table's legend says the same):
  loss_own, loss_other         denoising loss with the image's own vector / with the other K-1
                               candidates' vectors: fixed seeded noise at --num_timesteps timesteps
  conditioning_gain            loss_other - loss_own, with a bootstrap 95% interval over images;
                               pass: the interval lies above 0 (chance is 0)
  denoising_retrieval          how often the own vector gives the lowest loss among --candidates K;
                               chance 1/K, pass: at least 3x chance
  generation_retrieval         generate --images_per_guide images from each guide, encode them with
                               --tagger_model: how often the own guide is the most similar (cosine);
                               chance 1/guides, pass: at least 2x chance; with own_similarity,
                               other_similarity and per_guide (the hits of each guide)
  generation_retrieval_second  the same with --second_encoder (a CLIP model: IP-Adapter's CLIP-I)
library/evaluation/metrics.py computes them (the trainer's validation uses the same code). The
recipe: settings -> held-out items -> model, PFG head, encoders -> vectors and latents ->
denoising metrics -> generation -> table, JSON, contact sheet.

eval.json: model, pfg_weights, encoder, images, seed, denoising {timesteps, candidates},
generation {prompt, sizes (WxH per guide), steps, scale, sampler, images_per_guide} (null with
--no-generate), loss_own, loss_other, conditioning_gain {value, low, high, chance, relative, pass},
denoising_retrieval {value, chance, ratio, pass}, generation_retrieval and
generation_retrieval_second {value, chance, ratio, pass, encoder, own_similarity,
other_similarity, per_guide {IMAGE: {hits, images}}} (null when not measured), legend {label: text}.
"""
from __future__ import annotations

import sys

from library.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    from library.cli_config import parse_settings
    from library.data.dataset_config import dataset_config_from_settings
    from library.evaluation.held_out import held_out_items
    from library.evaluation.settings import EvalSettings

    # 1. Settings and the held-out images: mistakes surface before any model loads.
    settings, _ = parse_settings(EvalSettings, argv, __doc__)
    settings.validate()
    dataset_config = dataset_config_from_settings(settings)
    items = held_out_items(dataset_config, settings.pfg_prompt, settings.num_images)

    import torch

    from library.evaluation.generation import generation_metrics
    from library.evaluation.held_out import item_features
    from library.evaluation.metrics import evaluate_denoising, load_eval_samples
    from library.evaluation.report import build_result, format_table, write_outputs
    from library.models.pfg import check_compatible
    from library.train.trainer import PFGTrainer, StepOptions

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
    prompt_encoder = model.prompt_encoder(clip_skip=settings.clip_skip)

    # 4. Conditioning gain and denoising retrieval.
    trainer = PFGTrainer(model, adapter, prompt_encoder, StepOptions(uncond=settings.uncond))
    denoising = evaluate_denoising(trainer, samples, settings.num_timesteps, settings.candidates, settings.seed, settings.n_boot)

    # 5. Generation retrieval, through the sampler gen_pfg.py uses.
    generation = None
    if settings.generate:
        generation = generation_metrics(settings, model, adapter, encoder, second, prompt_encoder, items, features, device, dtype)

    # 6. The table (its labels are eval.json's keys), the JSON and the contact sheet.
    result = build_result(settings, items, encoder.encoder_id if encoder else None, denoising, generation)
    print(format_table(result))
    write_outputs(settings, result, items, generation)
    return 0


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


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
