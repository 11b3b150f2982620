"""Prepare PFG features: run the image encoder (a WD tagger by default) over the training images
and write one `<stem>_pfg.npz` per image (see library/data/features.py for the keys).

    python prepare_features.py --train_data_dir IMAGES --tagger_model TAGGER
    python prepare_features.py --dataset_config DATASET.toml --tagger_model TAGGER [--batch_size 32] [--device cuda]
        [--write_tags] [--cache_latents --pretrained_model_name_or_path SD]

`--tagger_model` names the image encoder: a WD tagger (folder with model.onnx + selected_tags.csv,
a bare .onnx, or a hub id) or a CLIP vision model (a transformers save_pretrained folder, or a hub
id with `--encoder clip`). `--encoder auto` (default) tells local models apart by their files.

`--write_tags` writes kohya-style `<stem>.txt` tag captions from the same WD forward pass.
`--cache_latents` also writes the trainer's latent caches (`<stem>_WWWWxHHHH_sd.npz`), bucketed
from the same dataset config, which `train_pfg.py --cache_latents_to_disk` then reuses.

Resumable: images whose caches are still valid are skipped. Broken images are reported one line
each and skipped; the exit status is 1 when any failed. Under `accelerate launch` (or torchrun)
each process takes its own share of the images. Every option may also live in `--config_file`.

The recipe: settings -> dataset -> encoder -> caches (library/prepare/run.py).
"""
from __future__ import annotations

import sys

from library.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    from library.cli_config import parse_settings
    from library.prepare.run import prepare_features
    from library.prepare.settings import PrepareSettings

    settings, _ = parse_settings(PrepareSettings, argv, __doc__)
    settings.validate()
    return prepare_features(settings)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
