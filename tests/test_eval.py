"""The conditioning-quality evaluator: its statistics on synthetic inputs, and eval_pfg.py on a
shortened demo (fitted tiny models, a short training run) through its entry point."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from library.evaluation.metrics import (
    candidate_sets, conditioning_gain, cosine_matrix, denoising_retrieval, eval_timesteps, generation_retrieval,
)

# -- the statistics -------------------------------------------------------------------------


def test_bootstrap_interval_brackets_a_clear_gain():
    own = torch.zeros(40)
    shuffled = 1.0 + 0.1 * torch.randn(40, generator=torch.Generator().manual_seed(0))
    gain = conditioning_gain(own, shuffled, n_boot=2000, seed=1)
    assert gain.mean == pytest.approx(float(shuffled.double().mean()), abs=1e-12)
    assert 0.9 < gain.low < gain.mean < gain.high < 1.1
    assert gain.above_zero
    # A standard error of 0.1/sqrt(40): the 95% interval is about +-2 of them wide.
    assert gain.high - gain.low == pytest.approx(2 * 1.96 * float(shuffled.std()) / 40 ** 0.5, rel=0.25)


def test_bootstrap_interval_of_noise_includes_zero_and_is_reproducible():
    noise = torch.randn(30, generator=torch.Generator().manual_seed(3))
    noise = noise - noise.mean()  # exactly zero mean
    first = conditioning_gain(torch.zeros(30), noise, n_boot=1000, seed=7)
    assert first.low < 0 < first.high and not first.above_zero
    assert conditioning_gain(torch.zeros(30), noise, n_boot=1000, seed=7) == first
    constant = conditioning_gain(torch.ones(5), torch.full((5,), 1.5))
    assert constant.mean == constant.low == constant.high == pytest.approx(0.5)


def test_denoising_retrieval_counts_strict_wins_of_column_zero():
    losses = torch.tensor([
        [0.1, 0.2, 0.3, 0.4],  # own lowest: hit
        [0.5, 0.2, 0.9, 0.9],  # another lower: miss
        [0.2, 0.2, 0.3, 0.3],  # tie: not a win
        [0.0, 1.0, 1.0, 1.0],  # hit
    ])
    result = denoising_retrieval(losses)
    assert result.top1 == pytest.approx(0.5)
    assert result.chance == pytest.approx(0.25)
    assert result.ratio == pytest.approx(2.0)


def test_candidate_sets_put_the_own_image_first_and_others_distinct():
    sets = candidate_sets(7, 4, seed=0)
    assert sets.shape == (7, 4)
    for i, row in enumerate(sets.tolist()):
        assert row[0] == i and i not in row[1:] and len(set(row)) == 4
    assert torch.equal(sets, candidate_sets(7, 4, seed=0))
    assert not torch.equal(sets, candidate_sets(7, 4, seed=1))
    assert candidate_sets(3, 8, seed=0).shape == (3, 3)  # K is capped by the image count


def test_eval_timesteps_span_the_schedule():
    assert eval_timesteps(4) == [125, 375, 625, 875]
    assert eval_timesteps(1) == [500]


def test_generation_retrieval_on_synthetic_vectors():
    guides = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    close = guides + 0.05 * torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    report = generation_retrieval(close, guides)
    assert report.retrieval.top1 == 1.0 and report.retrieval.chance == pytest.approx(1 / 6)
    assert report.own_similarity > 0.99 > report.other_similarity
    shifted = generation_retrieval(close.roll(1, dims=0), guides)  # every image matches a wrong guide
    assert shifted.retrieval.top1 == 0.0 and shifted.own_similarity < shifted.other_similarity + 0.5
    sim = cosine_matrix(guides, guides)
    assert torch.allclose(sim.diagonal(), torch.ones(6, dtype=torch.float64))
    # two images per guide, rows grouped by guide; one of guide 0's images drawn from guide 1
    rows = torch.cat([close, close + 0.01]).view(2, 6, 32).transpose(0, 1).reshape(12, 32).clone()
    rows[1] = guides[1]
    owners = torch.arange(6).repeat_interleave(2)
    several = generation_retrieval(rows, guides, owners)
    assert several.retrieval.top1 == pytest.approx(11 / 12) and several.retrieval.chance == pytest.approx(1 / 6)


# -- the shortened demo, through the entry points -----------------------------------------

SHORT_TRAIN_STEPS = 200


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory, tiny_sd1) -> dict:
    """The demo pipeline with fewer fitting and training steps: fitted tagger and VAE, features,
    a short full-UNet training run on the training split. Held-out images stay unseen."""
    import prepare_features
    import train_pfg
    from tools.fit_demo_models import fit_demo_models
    from tools.make_demo_dataset import build_demo_dataset

    root = tmp_path_factory.mktemp("short-demo")
    data = build_demo_dataset(root / "data", seed=0)
    paths = fit_demo_models(data, tiny_sd1, root / "models", tagger_steps=100, vae_steps=40, seed=0)
    common = ("[general]\nresolution = 128\nbatch_size = 4\nenable_bucket = true\nmin_bucket_reso = 64\n"
              "max_bucket_reso = 256\nbucket_reso_steps = 32\n\n[[datasets]]\n[[datasets.subsets]]\n")
    train_toml, heldout_toml = root / "train.toml", root / "heldout.toml"
    train_toml.write_text(common + f"image_dir = \"{paths['train'].as_posix()}\"\n")
    heldout_toml.write_text(common + f"image_dir = \"{paths['heldout'].as_posix()}\"\n")
    assert prepare_features.main(["--dataset_config", str(train_toml), "--tagger_model", str(paths["tagger"])]) == 0
    out = root / "train"
    assert train_pfg.main([
        "--pretrained_model_name_or_path", str(paths["model"]), "--dataset_config", str(train_toml),
        "--output_dir", str(out), "--output_name", "short", "--train_unet", "full", "--optimizer_type", "AdamW",
        "--learning_rate", "1.5e-3", "--pfg_learning_rate", "3e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "10",
        "--min_snr_gamma", "5", "--max_train_steps", str(SHORT_TRAIN_STEPS), "--cache_latents", "--seed", "42",
    ]) == 0
    return {"root": root, "heldout": heldout_toml, "tagger": paths["tagger"], "model": out / "short.safetensors",
            "pfg": out / "short-pfg.safetensors", "train_dir": paths["train"], "heldout_dir": paths["heldout"]}


def _eval(demo: dict, pfg: Path, json_path: Path, *extra: str) -> dict:
    import eval_pfg

    assert eval_pfg.main([
        "--pretrained_model_name_or_path", str(demo["model"]), "--pfg_weights", str(pfg),
        "--tagger_model", str(demo["tagger"]), "--dataset_config", str(demo["heldout"]),
        "--output_json", str(json_path), "--seed", "0", *extra,
    ]) == 0
    return json.loads(json_path.read_text())


def test_split_keeps_held_out_images_away_from_training(short_demo):
    train = {p.name for p in short_demo["train_dir"].iterdir() if not p.name.startswith(".")}
    heldout = {p.name for p in short_demo["heldout_dir"].iterdir() if not p.name.startswith(".")}
    assert len(heldout) == 6 and {n.split("_")[0] for n in heldout} == {"ruby", "cobalt", "fern", "sunny", "violet", "ember"}
    assert not train & heldout and len([n for n in train if not n.endswith(".npz")]) == 30


def test_short_demo_training_gives_a_positive_gain_and_documented_json(short_demo, tmp_path, capsys):
    result = _eval(short_demo, short_demo["pfg"], tmp_path / "eval.json",
                   "--num_timesteps", "16", "--W", "64", "--H", "64", "--steps", "4", "--images_per_guide", "2",
                   "--contact_sheet", str(tmp_path / "sheet.png"))
    gain = result["denoising"]["gain"]
    assert gain["low"] > 0 and gain["above_zero"], gain
    assert set(result) == {"model", "pfg_weights", "encoder", "images", "seed", "denoising", "generation"}
    assert set(result["denoising"]) == {"timesteps", "candidates", "loss_own", "loss_shuffled", "gain", "retrieval"}
    assert len(result["denoising"]["timesteps"]) == 16 and result["denoising"]["candidates"] == 6
    assert set(result["denoising"]["retrieval"]) == {"top1", "chance", "ratio"}
    generation = result["generation"]
    assert set(generation["encoder"]) == {"own_similarity", "other_similarity", "top1", "chance", "ratio"}
    assert generation["second_encoder"] is None and generation["sizes"] == ["64x64"] * 6 and generation["images_per_guide"] == 2
    assert len(result["images"]) == 6 and all(name.split(".")[0].endswith("_05") for name in result["images"])
    from PIL import Image

    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == (3 * 160, 6 * 160)  # guide and its 2 generated images, one row per held-out image
    printed = capsys.readouterr().out
    assert "conditioning gain" in printed and "generation, encoder" in printed


def test_random_untrained_pfg_head_shows_no_conditioning(short_demo, tmp_path):
    """The control: a never-trained head of the trained head's shape, measured like the trained one.
    A random linear map of the vectors can pass the UNet a trace of identity, so its gain need not
    be exactly zero (one such head measured +0.00002, interval above zero): it must be negligible
    next to the trained head's, and retrieval must stay at chance."""
    from library.models.pfg import PFGAdapter, PFGShape, save_pfg

    torch.manual_seed(123)
    random_head = PFGAdapter(PFGShape(10, 768, 32))
    path = tmp_path / "random-pfg.safetensors"
    save_pfg(random_head, path, {"pfg.num_tokens": "10"})
    trained = _eval(short_demo, short_demo["pfg"], tmp_path / "trained.json", "--no-generate")["denoising"]
    control = _eval(short_demo, path, tmp_path / "random.json", "--no-generate")["denoising"]
    assert trained["gain"]["above_zero"], trained["gain"]
    assert control["gain"]["mean"] < 0.05 * trained["gain"]["mean"], (control["gain"], trained["gain"])
    assert control["gain"]["high"] < trained["gain"]["low"], (control["gain"], trained["gain"])
    assert control["retrieval"]["top1"] <= 2 / 6 < trained["retrieval"]["top1"], (control["retrieval"], trained["retrieval"])
