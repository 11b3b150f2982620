"""The CLIP vision encoder family: transformers model + image processor, through prepare_features.py."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

import prepare_features
from library.models.image_encoders.clip import ClipVisionEncoder
from library.models.image_encoders import detect_encoder_kind, load_encoder
from library.errors import UserError
from library.data.features import feature_cache_path, read_encoder_id, read_feature
from library.data.images import load_image


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
    from transformers import CLIPVisionConfig, CLIPVisionModel

    no_projection = tmp_path / "no-projection"  # a vision tower without its projection: not silently random
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=64, patch_size=16)).save_pretrained(no_projection)
    with pytest.raises(UserError, match=r"not a complete CLIP vision model: 1 weights missing .*\(visual_projection.weight\)"):
        load_encoder(str(no_projection), kind="clip")


@pytest.fixture(scope="session")
def tiny_full_clip(kit_dir):
    """A full CLIPModel (text and vision towers) saved as the hub CLIP repos are (openai/clip-vit-*,
    laion/CLIP-ViT-*): one config with both towers, one model.safetensors."""
    from transformers import CLIPConfig, CLIPModel

    folder = kit_dir / "tiny-full-clip"
    if not (folder / "model.safetensors").is_file():
        config = CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16),
            projection_dim=24,
        )
        torch.manual_seed(1)
        CLIPModel(config).eval().save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def _cache_repo(cache, repo_id, revision="0123abc"):
    """The layout huggingface_hub keeps: a snapshot folder per revision and refs/main naming it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def test_hub_repo_downloads_one_weights_format_and_serves_offline_runs(tiny_full_clip, tmp_path, capsys, monkeypatch):
    """A hub CLIP repo (a full CLIPModel among decoys: open_clip, fp16, .bin, flax copies) loads
    through hf_hub_download fetching only config, preprocessor config and model.safetensors; the
    vectors are CLIPModel's image features. Offline, the real huggingface_hub serves the same
    files from its cache; a repo in a subfolder (IP-Adapter's image encoder, no preprocessor
    config) uses CLIP's stock preprocessing."""
    import httpx2  # what huggingface_hub's HTTP errors wrap
    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from transformers import CLIPModel

    remote = {f.name: f for f in tiny_full_clip.iterdir() if f.is_file()}
    decoys = {"open_clip_model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "flax_model.msgpack", "tokenizer.json"}
    cache, requested = tmp_path / "hub-cache", []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        name = f"{subfolder}/{filename}" if subfolder else filename
        requested.append(name)
        assert filename not in decoys, f"downloaded {filename}"
        if subfolder not in (None, "models/image_encoder") or filename not in remote or (subfolder and filename == "preprocessor_config.json"):
            request = httpx2.Request("GET", f"https://huggingface.co/{repo_id}/resolve/main/{name}")
            raise RemoteEntryNotFoundError(f"404 Client Error: Entry Not Found for url: {request.url}",
                                           response=httpx2.Response(404, request=request))
        target = _cache_repo(cache, repo_id) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(remote[filename].read_bytes())
        return str(target)

    images = _images(tmp_path / "data")
    with monkeypatch.context() as online:
        online.setattr(huggingface_hub, "hf_hub_download", fake_download)
        args = ["--train_data_dir", str(tmp_path / "data"), "--tagger_model", "openai/clip-tiny-test", "--encoder", "clip"]
        assert prepare_features.main(args) == 0
        assert requested == ["config.json", "preprocessor_config.json", "model.safetensors"]
        online_vectors = [read_feature(feature_cache_path(p)) for p in images]
        encoder_id = read_encoder_id(feature_cache_path(images[0]))
        assert encoder_id.startswith("clip-tiny-test:")

        requested.clear()
        ip_adapter = load_encoder("h94/IP-Adapter-tiny/models/image_encoder", kind="clip")
        assert requested == ["models/image_encoder/config.json", "models/image_encoder/preprocessor_config.json",
                             "models/image_encoder/model.safetensors"]
        assert "no preprocessor_config.json: using CLIP's standard preprocessing at 64x64" in capsys.readouterr().out
        assert ip_adapter.encoder_id.startswith("image_encoder:") and ip_adapter.encoder_id.split(":")[1] == encoder_id.split(":")[1]

    model = CLIPModel.from_pretrained(tiny_full_clip).eval()
    pixels = CLIPImageProcessor.from_pretrained(tiny_full_clip)(images=[load_image(p) for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels)
        expected = getattr(expected, "pooler_output", expected).numpy()  # a tensor, or an output object in newer transformers
    for vector, row in zip(online_vectors, expected):
        assert vector.shape == (24,)
        np.testing.assert_allclose(vector, row, atol=1e-5)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the real library, no network
    offline = load_encoder("openai/clip-tiny-test", kind="clip")
    assert offline.encoder_id == encoder_id
    np.testing.assert_allclose(offline.encode([load_image(p) for p in images]), np.stack(online_vectors), atol=1e-6)
    with pytest.raises(UserError, match="'openai/clip-other' is not a local folder and could not be downloaded"):
        load_encoder("openai/clip-other", kind="clip")
