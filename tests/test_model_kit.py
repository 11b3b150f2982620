"""The offline model kit and demo dataset: real SD layouts, SD1/SD2 differences, determinism."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import toml
import torch
from PIL import Image

from library.errors import UserError
from tools.make_demo_dataset import CHARACTERS, IMAGES_PER_CHARACTER, build_demo_dataset
from tools.make_tiny_sd import build_tiny_sd

REPO = Path(__file__).resolve().parent.parent


def _tree_digest(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in exclude
    }


@pytest.fixture(scope="module")
def pipes(tiny_sd1, tiny_sd2):
    from diffusers import StableDiffusionPipeline

    return {v: StableDiffusionPipeline.from_pretrained(p, local_files_only=True) for v, p in (("sd1", tiny_sd1), ("sd2", tiny_sd2))}


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_sd_folder_has_real_layout_and_eighth_size_latents(pipes, variant):
    pipe = pipes[variant]
    unet = pipe.unet.config
    assert unet.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet.up_block_types == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet.layers_per_block == 2 and unet.in_channels == unet.out_channels == 4
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)

    with torch.no_grad():
        latents = pipe.vae.encode(torch.rand(1, 3, 96, 160) * 2 - 1).latent_dist.mean
        assert latents.shape == (1, 4, 12, 20)
        assert pipe.vae.decode(latents).sample.shape == (1, 3, 96, 160)
        # Clip skip needs several layers to choose from.
        ids = pipe.tokenizer("a", padding="max_length", max_length=77, return_tensors="pt").input_ids
        out = pipe.text_encoder(ids, output_hidden_states=True)
    assert len(out.hidden_states) >= 4
    assert out.last_hidden_state.shape == (1, 77, unet.cross_attention_dim)


def test_sd2_differs_from_sd1_where_the_real_models_do(pipes, tiny_sd1, tiny_sd2):
    from diffusers import DDPMScheduler

    sd1, sd2 = pipes["sd1"], pipes["sd2"]
    # Training code builds a DDPMScheduler from whatever scheduler the folder ships.
    assert DDPMScheduler.from_pretrained(tiny_sd1, subfolder="scheduler").config.prediction_type == "epsilon"
    assert DDPMScheduler.from_pretrained(tiny_sd2, subfolder="scheduler").config.prediction_type == "v_prediction"
    assert sd1.unet.config.cross_attention_dim != sd2.unet.config.cross_attention_dim
    assert sd2.unet.config.cross_attention_dim == sd2.text_encoder.config.hidden_size
    assert (sd1.unet.config.use_linear_projection, sd2.unet.config.use_linear_projection) == (False, True)
    assert (sd1.text_encoder.config.hidden_act, sd2.text_encoder.config.hidden_act) == ("quick_gelu", "gelu")
    assert (sd1.tokenizer.pad_token, sd2.tokenizer.pad_token) == ("<|endoftext|>", "!")
    assert (sd1.tokenizer.pad_token_id, sd2.tokenizer.pad_token_id) == (49407, 0)


def test_tokenizer_matches_real_clip(pipes):
    for pipe in pipes.values():
        assert pipe.tokenizer("illustration of a girl").input_ids == [49406, 6052, 539, 320, 1611, 49407]
        assert len(pipe.tokenizer) == 49408


def test_sd_build_is_deterministic_reused_and_safe(tiny_sd1, tmp_path):
    again = build_tiny_sd(tmp_path / "again", variant="sd1", seed=0)
    weights = ("diffusion_pytorch_model.safetensors", "model.safetensors")
    digest = {k: v for k, v in _tree_digest(again).items() if k.endswith(weights)}
    assert len(digest) == 3
    assert digest == {k: v for k, v in _tree_digest(tiny_sd1).items() if k in digest}

    marker = again / "tiny_kit.json"
    mtime = marker.stat().st_mtime_ns
    assert build_tiny_sd(again, variant="sd1", seed=0) == again
    assert marker.stat().st_mtime_ns == mtime  # reused, not rebuilt

    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("keep me")
    with pytest.raises(UserError):
        build_tiny_sd(tmp_path / "user", variant="sd1", seed=0)
    assert (tmp_path / "user" / "precious.txt").exists()


def test_different_seed_gives_different_weights():
    from tools.make_tiny_sd import VARIANTS, build_unet

    a = build_unet(VARIANTS["sd1"], seed=0).conv_in.weight
    b = build_unet(VARIANTS["sd1"], seed=1).conv_in.weight
    assert not torch.equal(a, b)


def test_demo_dataset_counts_shapes_and_captions(demo_dataset):
    doc = json.loads((demo_dataset / "characters.json").read_text())
    images = doc["images"]
    assert len(doc["characters"]) == len(CHARACTERS) == 6
    assert len(images) == 6 * IMAGES_PER_CHARACTER == 36
    names = {c["name"] for c in doc["characters"]}
    assert {n: sum(i["character"] == n for i in images) for n in names} == {n: IMAGES_PER_CHARACTER for n in names}
    # Every character has its own colour and shape, so an encoder can tell them apart.
    assert len({c["colour"] for c in doc["characters"]}) == len({c["shape"] for c in doc["characters"]}) == 6

    aspects = set()
    for item in images:
        path = demo_dataset / item["file"]
        with Image.open(path) as im:
            assert im.size == (item["width"], item["height"])
        w, h = im.size
        aspects.add("portrait" if h > w else "landscape" if w > h else "square")
        caption = path.with_suffix(".txt")
        assert caption.exists() == (item["caption"] is not None)
        if item["caption"]:
            assert caption.read_text().strip() == item["caption"]
            assert item["caption"].startswith(f"illustration of {item['character']}, ")
    assert aspects == {"portrait", "landscape", "square"}
    assert len({(i["width"], i["height"]) for i in images}) >= 6
    assert 0 < sum(i["caption"] is not None for i in images) < len(images)
    assert {Path(i["file"]).suffix for i in images} == {".png", ".jpg"}


def test_demo_dataset_is_byte_identical_per_seed(demo_dataset, tmp_path):
    again = _tree_digest(build_demo_dataset(tmp_path / "same", seed=0))
    # Compare only what the builder writes: other tests may add caches beside the images.
    assert again == {k: v for k, v in _tree_digest(demo_dataset).items() if k in again}
    other = _tree_digest(build_demo_dataset(tmp_path / "other", seed=1))
    assert other.keys() == again.keys()
    assert other["images/ruby_00.png"] != again["images/ruby_00.png"]


def test_demo_toml_points_at_the_demo_layout():
    config = toml.load(REPO / "configs" / "demo_dataset.toml")
    general = config["general"]
    assert general["resolution"] == 128 and general["enable_bucket"] is True
    assert general["bucket_reso_steps"] % 8 == 0
    (subset,) = config["datasets"][0]["subsets"]
    # training reads the train split that tools/fit_demo_models.py makes; evaluation the held-out one
    assert subset["image_dir"] == "demo_output/data/train"
    (held_out,) = toml.load(REPO / "configs" / "demo_eval_dataset.toml")["datasets"][0]["subsets"]
    assert held_out["image_dir"] == "demo_output/data/heldout"


def test_sd15_size_variant_has_sd15_parameter_counts():
    """`--variant sd15-size` (for benchmarks and memory measurements) is SD 1.5 to the parameter:
    built on the meta device, so no memory is spent."""
    import torch

    from tools.make_tiny_sd import build_pipeline

    with torch.device("meta"):
        pipe = build_pipeline("sd15-size")
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert pipe.unet.config.cross_attention_dim == 768 and pipe.unet.config.sample_size == 64
