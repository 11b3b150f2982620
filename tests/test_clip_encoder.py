"""The CLIP vision encoder family: transformers model + image processor, through prepare_features.py."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

import prepare_features
from library.encoders import ClipVisionEncoder, detect_encoder_kind, load_encoder
from library.errors import UserError
from library.features import feature_cache_path, read_encoder_id, read_feature
from library.images import load_image
from tools.make_tiny_clip_vision import build_tiny_clip_vision


@pytest.fixture(scope="session")
def tiny_clip(kit_dir):
    return build_tiny_clip_vision(kit_dir / "tiny-clip-vision", seed=0)


def _images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        arr = np.random.default_rng(i).integers(0, 256, (50 + 20 * i, 90, 4), dtype=np.uint8)
        Image.fromarray(arr, "RGBA").save(path)  # alpha: composited on white like every other encoder input
        paths.append(path)
    return paths


def test_vectors_equal_a_direct_transformers_run(tiny_clip, tmp_path, capsys):
    images = _images(tmp_path / "data")
    assert detect_encoder_kind(str(tiny_clip)) == "clip"
    code = prepare_features.main(["--train_data_dir", str(tmp_path / "data"), "--tagger_model", str(tiny_clip), "--batch_size", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "3 written" in out and "torch cpu" in out

    model = CLIPVisionModelWithProjection.from_pretrained(tiny_clip).eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_clip)
    pixels = processor(images=[load_image(p) for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels).image_embeds.numpy()
    encoder_id = read_encoder_id(feature_cache_path(images[0]))
    assert encoder_id.startswith("tiny-clip-vision:") and len(encoder_id.split(":")[1]) == 12
    for image, row in zip(images, expected):
        vector = read_feature(feature_cache_path(image))
        assert vector.shape == (48,)
        np.testing.assert_allclose(vector, row, atol=1e-5)

    capsys.readouterr()
    assert prepare_features.main(["--train_data_dir", str(tmp_path / "data"), "--tagger_model", str(tiny_clip), "--encoder", "clip"]) == 0
    assert "0 written, 3 skipped (valid cache)" in capsys.readouterr().out


def test_encoder_id_follows_the_weights(tiny_clip, tmp_path):
    reference = load_encoder(str(tiny_clip))
    assert isinstance(reference, ClipVisionEncoder) and reference.dim == 48
    copy = tmp_path / "tiny-clip-vision"
    shutil.copytree(tiny_clip, copy)
    assert load_encoder(str(copy)).encoder_id == reference.encoder_id  # same name, same weights

    model = CLIPVisionModelWithProjection.from_pretrained(copy)
    with torch.no_grad():
        model.visual_projection.weight.add_(0.01)
    model.save_pretrained(copy)
    changed = load_encoder(str(copy))
    assert changed.encoder_id != reference.encoder_id and changed.encoder_id.startswith("tiny-clip-vision:")


def test_clip_misuse_is_a_clear_error(tiny_clip, tmp_path):
    _images(tmp_path / "data", 1)
    with pytest.raises(UserError, match="--write_tags needs a WD tagger"):
        prepare_features.main(["--train_data_dir", str(tmp_path / "data"), "--tagger_model", str(tiny_clip), "--write_tags"])
    with pytest.raises(UserError, match="feature_tensor"):
        load_encoder(str(tiny_clip), feature_tensor="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_encoder(str(tmp_path / "empty"), kind="clip")
    with pytest.raises(UserError, match="some-owner/some-clip"):  # offline in tests: no download
        load_encoder("some-owner/some-clip", kind="clip")
