#!/usr/bin/env bash
# Newcomer command 1: set up (once) and run the whole PFG pipeline on the bundled demo —
# tiny offline models, a synthetic dataset, feature preparation, training, generation.
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=demo_output
started=$SECONDS

echo "== 1/5 building the tiny offline models and the demo dataset"
python -m tools.make_tiny_sd --out "$out/models/tiny-sd1" --variant sd1
python -m tools.make_tiny_tagger --out "$out/models/tiny-tagger"
python -m tools.make_demo_dataset --out "$out/data"

echo "== 2/5 prepare_features.py: tagger vectors for every image"
python prepare_features.py --dataset_config configs/demo_dataset.toml --tagger_model "$out/models/tiny-tagger"

echo "== 3/5 train_pfg.py under accelerate: PFG head + full UNet"
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_pfg.py --config_file configs/demo_train.toml

echo "== 4/5 gen_pfg.py: images guided by two demo images"
python gen_pfg.py --pretrained_model_name_or_path "$out/train/demo.safetensors" \
    --pfg_weights "$out/train/demo-pfg.safetensors" --tagger_model "$out/models/tiny-tagger" \
    --image "$out/data/images/ruby_00.png" --from_file configs/demo_prompts.txt \
    --W 128 --H 128 --steps 20 --images_per_prompt 2 --outdir "$out/generated" --grid

echo "== 5/5 done in $((SECONDS - started)) s. Outputs:"
echo "  trained PFG head:   $out/train/demo-pfg.safetensors"
echo "  trained checkpoint: $out/train/demo.safetensors"
echo "  generated images:   $out/generated/ (grid-*.png: guide images beside their results)"
