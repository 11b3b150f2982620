"""Why does a guide fail generation retrieval? Two probes of a trained PFG model on its held-out
images, with eval_pfg.py's flags and metrics (docs/BENCHMARKS.md, demo section, has the demo's):

1. the conditioning gain of every held-out image at one timestep at a time (eval_pfg.py's gain:
   the loss with the other images' vectors minus with its own): sampling fixes an image's layout
   and colours at high noise, so a guide whose gain vanishes there cannot steer it;
2. generation retrieval per guide at several --pfg_scales: whether a stronger guide helps.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_guides.py --config_file configs/demo_eval.toml   # after ./demo.sh
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli_config import setting  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.evaluation.settings import EvalSettings  # noqa: E402


@dataclass(frozen=True)
class GuideProbeSettings(EvalSettings):
    probe_timesteps: list[int] = setting([63, 188, 313, 438, 563, 688, 813, 938], "timesteps probed one at a time")
    probe_repeats: int = setting(4, "noise draws per image and timestep")
    pfg_scales: list[float] = setting([1.0, 2.0, 3.0], "--pfg_scale values of the generation probe")


def main(argv: list[str] | None = None) -> int:
    from library.cli_config import parse_settings
    from library.data.dataset_config import dataset_config_from_settings
    from library.evaluation.held_out import held_out_items

    settings, _ = parse_settings(GuideProbeSettings, argv, __doc__)
    settings.validate()
    items = held_out_items(dataset_config_from_settings(settings), settings.pfg_prompt, settings.num_images)

    import torch

    from library.evaluation.generation import generation_metrics
    from library.evaluation.held_out import item_features
    from library.evaluation.metrics import denoising_losses, load_eval_samples
    from library.models.image_encoders import load_encoder
    from library.models.loading import load_for_inference
    from library.models.pfg import load_pfg
    from library.train.trainer import PFGTrainer, StepOptions

    device, dtype = torch.device(settings.device or "cpu"), torch.float32
    model = load_for_inference(settings.pretrained_model_name_or_path, v_prediction=settings.v_parameterization, vae=settings.vae,
                               lora_files=settings.network_weights, lora_multipliers=settings.network_mul, device=device, dtype=dtype)
    adapter, _ = load_pfg(settings.pfg_weights, model.cross_attention_dim)
    adapter.to(device, dtype=dtype).eval()
    encoder = load_encoder(settings.tagger_model, device=device.type, feature_tensor=settings.feature_tensor or None)
    features = item_features(items, encoder)
    samples = load_eval_samples(items, features, model.vae)
    prompt_encoder = model.prompt_encoder(clip_skip=settings.clip_skip)
    trainer = PFGTrainer(model, adapter, prompt_encoder, StepOptions(uncond=settings.uncond))
    names = [item.image_path.stem for item in items]

    # 1. Every image against every other image's vector, one timestep at a time.
    n = len(samples)
    everyone = torch.tensor([[i, *[j for j in range(n) if j != i]] for i in range(n)])
    print("conditioning gain per held-out image and timestep (loss with the others' vectors minus with its own)")
    print(f"{'t':>5s} " + " ".join(f"{name:>10s}" for name in names))
    for t in settings.probe_timesteps:
        losses = denoising_losses(trainer, samples, everyone, [t] * settings.probe_repeats, settings.seed + t)
        gain = losses[:, 1:].mean(dim=1) - losses[:, 0]
        print(f"{t:5d} " + " ".join(f"{g:+10.4f}" for g in gain.tolist()), flush=True)

    # 2. Generation retrieval per guide as the guide's tokens get stronger.
    print("generation retrieval per guide (hits of --images_per_guide) by --pfg_scale")
    for scale in settings.pfg_scales:
        report = generation_metrics(replace(settings, pfg_scale=scale), model, adapter, encoder, None, prompt_encoder,
                                    items, features, device, dtype)
        hits = report.retrieval.per_guide(n)
        print(f"pfg_scale {scale:g}: " + ", ".join(f"{name} {h}/{k}" for name, (h, k) in zip(names, hits))
              + f"; top-1 {report.retrieval.retrieval.top1:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
