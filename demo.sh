#!/usr/bin/env bash
# Newcomer command 1: set up (once) and run the whole PFG pipeline on the bundled demo —
# tiny offline models fitted to a synthetic dataset, feature preparation, training, generation,
# and the proof: eval_pfg.py measures on held-out images how strongly the model follows its guide.
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# A fixed two threads per process: fitting runs 1.75x faster than on one (training 1.07x), the
# fitted demo models (and so the numbers) do not depend on the machine's core count, and a
# loaded machine is not oversubscribed as it is with one thread per core.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
out=demo_output
started=$SECONDS

echo "== 1/7 building the tiny offline models and the demo dataset"
python -m tools.make_tiny_sd --out "$out/models/tiny-sd1" --variant sd1
python -m tools.make_demo_dataset --out "$out/data"

echo "== 2/7 fitting the demo world: held-out split, tagger fitted to the demo tags, VAE to the images"
python -m tools.fit_demo_models --data "$out/data" --base_model "$out/models/tiny-sd1" --out "$out/models"

echo "== 3/7 prepare_features.py: tagger vectors for every training image"
python prepare_features.py --dataset_config configs/demo_dataset.toml --tagger_model "$out/models/demo-tagger"

echo "== 4/7 train_pfg.py under accelerate: PFG head + full UNet"
# --quiet: a mistake shows as train_pfg.py's one `error:` line, without accelerate's traceback after it
accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_pfg.py --config_file configs/demo_train.toml

echo "== 5/7 gen_pfg.py: images guided by held-out demo images"
# Each line of the prompt file names its guide (--i); the images are NNNNN-SEED.png.
python gen_pfg.py --pretrained_model_name_or_path "$out/train/demo.safetensors" \
    --pfg_weights "$out/train/demo-pfg.safetensors" --tagger_model "$out/models/demo-tagger" \
    --from_file configs/demo_prompts.txt \
    --W 128 --H 128 --steps 20 --images_per_prompt 2 --outdir "$out/generated" --grid

echo "== 6/7 eval_pfg.py: conditioning gain, denoising and generation retrieval on held-out images"
python eval_pfg.py --config_file configs/demo_eval.toml

echo "== 7/7 done in $((SECONDS - started)) s. Outputs:"
echo "  fitted demo models: $out/models/demo-tagger, $out/models/demo-sd1 (held-out images: $out/data/heldout)"
echo "  trained PFG head:   $out/train/demo-pfg.safetensors"
echo "  trained checkpoint: $out/train/demo.safetensors"
echo "  generated images:   $out/generated/ (NNNNN-SEED.png; grid-NNNNN.png: each prompt's guide beside its results, labelled)"
echo "  evaluation:         $out/eval/eval.json (the numbers above, under the same labels; docs/BENCHMARKS.md explains them)"
echo "  contact sheet:      $out/eval/contact_sheet.png (each held-out guide beside what the model generated from it)"
