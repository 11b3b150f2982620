"""Build a tiny CLIP vision encoder: transformers' real CLIPVisionModelWithProjection with random
weights, saved with save_pretrained beside a CLIPImageProcessor config, so the CLIP encoder path
of prepare_features.py is tested offline exactly as a downloaded model folder is loaded.

    python -m tools.make_tiny_clip_vision --out models/tiny-clip-vision
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `library` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from library.fileio import atomic_dir  # noqa: E402

MARKER = ".complete"


def build_tiny_clip_vision(out_dir: Path, seed: int = 0, image_size: int = 64, projection_dim: int = 48) -> Path:
    """Write config.json, model.safetensors and preprocessor_config.json into out_dir.

    Deterministic from the seed; a second call with the same settings returns at once; the folder
    appears atomically.
    """
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    settings = dict(seed=seed, image_size=image_size, projection_dim=projection_dim)
    out_dir = Path(out_dir)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    if (out_dir / MARKER).is_file() and (out_dir / MARKER).read_text() == fingerprint:
        return out_dir

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=16, projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config).eval()
    # The stock CLIP recipe: shortest side to the model size, center crop, OpenAI mean/std.
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / MARKER).write_text(fingerprint)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build a tiny random-weight CLIP vision model folder (offline, seconds).")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"tiny CLIP vision model written to {build_tiny_clip_vision(args.out, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
