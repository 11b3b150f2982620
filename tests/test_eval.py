"""The conditioning-quality evaluator: its statistics on synthetic inputs, and eval_pfg.py on a
shortened demo (fitted tiny models, a short training run) through its entry point."""
from __future__ import annotations

import contextlib
import io
import json
import re
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
    assert report.per_guide(6) == [(1, 1)] * 6
    # Every image matches a wrong guide (image r is guide r-1's): own is the diagonal of the cosine
    # matrix, other the mean of the rest, which now holds each image's true match.
    shifted_rows = close.roll(1, dims=0)
    shifted = generation_retrieval(shifted_rows, guides)
    sim = cosine_matrix(shifted_rows, guides)
    assert shifted.own_similarity == pytest.approx(float(sim.diagonal().mean()))
    assert shifted.other_similarity == pytest.approx(float((sim.sum() - sim.diagonal().sum()) / 30))
    assert shifted.other_similarity > shifted.own_similarity + 0.2
    assert shifted.retrieval.top1 == 0.0 and shifted.nearest == (5, 0, 1, 2, 3, 4) and shifted.per_guide(6) == [(0, 1)] * 6
    assert torch.allclose(cosine_matrix(guides, guides).diagonal(), torch.ones(6, dtype=torch.float64))
    # two images per guide, rows grouped by guide; one of guide 0's images drawn from guide 1
    rows = torch.cat([close, close + 0.01]).view(2, 6, 32).transpose(0, 1).reshape(12, 32).clone()
    rows[1] = guides[1]
    owners = torch.arange(6).repeat_interleave(2)
    several = generation_retrieval(rows, guides, owners)
    assert several.retrieval.top1 == pytest.approx(11 / 12) and several.retrieval.chance == pytest.approx(1 / 6)
    assert several.per_guide(6) == [(1, 2)] + [(2, 2)] * 5  # the one miss is guide 0's, which the overall 11/12 hides


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
    progress = io.StringIO()  # the fitting's progress bars, for test_fitting_shows_a_bar_per_fit_with_its_loss
    with contextlib.redirect_stderr(progress):
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
            "pfg": out / "short-pfg.safetensors", "train_dir": paths["train"], "heldout_dir": paths["heldout"],
            "fit_progress": progress.getvalue()}


def _eval(demo: dict, pfg: Path, json_path: Path, *extra: str) -> dict:
    import eval_pfg

    assert eval_pfg.main([
        "--pretrained_model_name_or_path", str(demo["model"]), "--pfg_weights", str(pfg),
        "--tagger_model", str(demo["tagger"]), "--dataset_config", str(demo["heldout"]),
        "--output_json", str(json_path), "--seed", "0", *extra,
    ]) == 0
    return json.loads(json_path.read_text())


def test_fitting_shows_a_bar_per_fit_with_its_loss(short_demo):
    """demo.sh step 2/7 is minutes long: each fit reports its steps and latest loss as it goes."""
    lines = short_demo["fit_progress"].replace("\r", "\n").splitlines()
    for what, steps in (("fitting the VAE", 40), ("fitting the tagger", 100)):
        final = [line for line in lines if line.startswith(what) and f"{steps}/{steps}" in line]
        assert final and re.search(r"loss=\d+\.\d{4}", final[-1]), (what, lines[-5:])
    assert any(line.startswith("VAE round trips for the tagger") for line in lines)


def test_split_keeps_held_out_images_away_from_training(short_demo):
    train = {p.name for p in short_demo["train_dir"].iterdir() if not p.name.startswith(".")}
    heldout = {p.name for p in short_demo["heldout_dir"].iterdir() if not p.name.startswith(".")}
    assert len(heldout) == 6 and {n.split("_")[0] for n in heldout} == {"ruby", "cobalt", "fern", "sunny", "violet", "ember"}
    assert not train & heldout and len([n for n in train if not n.endswith(".npz")]) == 30


LABELS = ["loss_own", "loss_other", "conditioning_gain", "denoising_retrieval", "generation_retrieval",
          "generation_retrieval_second"]
SIMILARITY_LABELS = ["own_similarity", "other_similarity", "per_guide"]


def _sheet_cells(path: Path, rows: int, per_guide: int, size: int) -> list:
    """The generated images, cut back out of eval_pfg.py's contact sheet (160 px cells under a title
    line, label line below): images smaller than a cell are pasted unscaled, pixel for pixel."""
    from PIL import Image

    from library.sample.image_outputs import LINE

    cell, offset = 160, (160 - size) // 2
    with Image.open(path) as sheet:
        assert sheet.size == ((1 + per_guide) * cell, rows * (LINE + cell + LINE))
        return [sheet.convert("RGB").crop((c * cell + offset, r * (LINE + cell + LINE) + LINE + offset,
                                           c * cell + offset + size, r * (LINE + cell + LINE) + LINE + offset + size))
                for r in range(rows) for c in range(1, 1 + per_guide)]


def test_short_demo_training_gives_a_positive_gain_and_documented_json(short_demo, tiny_clip, tmp_path, capsys):
    from library.data.images import load_image
    from library.models.image_encoders import load_encoder

    result = _eval(short_demo, short_demo["pfg"], tmp_path / "eval.json",
                   "--num_timesteps", "16", "--W", "64", "--H", "64", "--steps", "4", "--images_per_guide", "2",
                   "--contact_sheet", str(tmp_path / "sheet.png"), "--second_encoder", str(tiny_clip))
    gain = result["conditioning_gain"]
    assert gain["low"] > 0 and gain["pass"], gain
    assert gain["value"] == pytest.approx(result["loss_other"] - result["loss_own"], rel=1e-6)
    assert gain["relative"] == pytest.approx(gain["value"] / result["loss_other"])
    assert set(result) == {"model", "pfg_weights", "encoder", "images", "seed", "denoising", "generation", "legend", *LABELS}
    assert set(result["legend"]) == set(LABELS)
    assert len(result["denoising"]["timesteps"]) == 16 and result["denoising"]["candidates"] == 6
    assert set(result["denoising_retrieval"]) == {"value", "chance", "ratio", "pass"}
    assert result["denoising_retrieval"]["pass"] == (result["denoising_retrieval"]["ratio"] >= 3)
    generation = result["generation"]
    assert generation["sizes"] == ["64x64"] * 6 and generation["images_per_guide"] == 2
    names = result["images"]
    assert len(names) == 6 and all(name.split(".")[0].endswith("_05") for name in names)

    # Generation retrieval per encoder, recomputed from the generated images themselves (cut out of the
    # contact sheet): the tagger's block in the tagger's space, the second block in CLIP's.
    from library.evaluation.metrics import generation_retrieval

    generated = _sheet_cells(tmp_path / "sheet.png", rows=6, per_guide=2, size=64)
    guides = [load_image(short_demo["heldout_dir"] / name) for name in names]
    owners = torch.arange(6).repeat_interleave(2)
    for label, encoder_path in (("generation_retrieval", short_demo["tagger"]), ("generation_retrieval_second", tiny_clip)):
        block, encoder = result[label], load_encoder(str(encoder_path))
        assert set(block) == {"value", "chance", "ratio", "pass", "encoder", *SIMILARITY_LABELS}
        assert block["encoder"] == encoder.encoder_id
        expected = generation_retrieval(torch.from_numpy(encoder.encode(generated)), torch.from_numpy(encoder.encode(guides)), owners)
        assert block["own_similarity"] == pytest.approx(expected.own_similarity, abs=1e-5)
        assert block["other_similarity"] == pytest.approx(expected.other_similarity, abs=1e-5)
        assert block["value"] == pytest.approx(expected.retrieval.top1) and block["chance"] == pytest.approx(1 / 6)
        hits = [(c["hits"], c["images"]) for c in block["per_guide"].values()]
        assert list(block["per_guide"]) == names and hits == expected.per_guide(6)
    tagger, clip = result["generation_retrieval"], result["generation_retrieval_second"]
    assert result["encoder"] == tagger["encoder"] != clip["encoder"]
    assert (clip["own_similarity"], clip["other_similarity"]) != (tagger["own_similarity"], tagger["other_similarity"])

    # The table's labels are eval.json's keys, each printed with its value; the legend follows.
    table, legend = capsys.readouterr().out.split("\nlegend", 1)
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("6 held-out images, seed 0"))
    rows = lines[header + 2:]  # below the column titles
    assert [line.split()[0] for line in rows] == LABELS[:5] + SIMILARITY_LABELS + LABELS[5:] + SIMILARITY_LABELS
    by_label = {line.split()[0]: line for line in rows[:5]}
    assert f"{result['loss_own']:.5f}" in by_label["loss_own"] and f"{gain['low']:.5f}" in by_label["conditioning_gain"]
    assert f"{tagger['value']:.3f}" in by_label["generation_retrieval"] and tagger["encoder"] in by_label["generation_retrieval"]
    assert all(f"  {label}: " in legend for label in LABELS)


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
    trained = _eval(short_demo, short_demo["pfg"], tmp_path / "trained.json", "--no-generate")
    control = _eval(short_demo, path, tmp_path / "random.json", "--no-generate")
    assert trained["generation"] is trained["generation_retrieval"] is None
    gain, control_gain = trained["conditioning_gain"], control["conditioning_gain"]
    assert gain["pass"], gain
    assert control_gain["value"] < 0.05 * gain["value"], (control_gain, gain)
    assert control_gain["high"] < gain["low"], (control_gain, gain)
    retrieval, control_retrieval = trained["denoising_retrieval"], control["denoising_retrieval"]
    assert control_retrieval["value"] <= 2 / 6 < retrieval["value"], (control_retrieval, retrieval)
    assert not control_retrieval["pass"]
