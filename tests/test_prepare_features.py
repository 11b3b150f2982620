"""prepare_features.py through its entry point: caches, resume, stale caches, bad images."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import prepare_features
from library.models.image_encoders import load_encoder
from library.models.image_encoders.wd_tagger import find_pooled_tensor
from library.errors import UserError
from library.data.features import feature_cache_path, load_valid_feature, read_cache, read_feature, save_feature
from library.data.images import load_image
from tools.make_tiny_tagger import build_tiny_tagger

REPO = Path(__file__).resolve().parent.parent


def _make_images(folder: Path, n: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 256, size=(40 + 20 * i, 90 - 10 * i, 3), dtype=np.uint8)
        path = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = prepare_features.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def _direct_vectors(tagger: Path, images: list[Path]) -> np.ndarray:
    """The pooled vectors by hand: reference graph edit + plain onnxruntime run."""
    model = onnx.load(str(tagger / "model.onnx"))
    pooled = find_pooled_tensor(model)
    model.graph.output.append(onnx.helper.make_tensor_value_info(pooled, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    encoder = load_encoder(str(tagger))
    batch = np.stack([encoder.preprocess(load_image(p)) for p in images])
    return session.run([pooled], {session.get_inputs()[0].name: batch})[0]


def test_writes_one_cache_per_image_equal_to_a_direct_run(tiny_tagger, tmp_path, capsys):
    images = _make_images(tmp_path / "data", 5)
    code, out = _run(capsys, "--train_data_dir", tmp_path / "data", "--tagger_model", tiny_tagger, "--batch_size", "2")
    assert code == 0, out
    assert "5 written, 0 skipped (valid cache), 0 failed" in out
    encoder_id = load_encoder(str(tiny_tagger)).encoder_id
    direct = _direct_vectors(tiny_tagger, images)
    for image, expected in zip(images, direct):
        cache = image.with_name(f"{image.stem}_pfg.npz")
        with np.load(cache) as data:
            assert sorted(data.files) == ["encoder", "feature", "source_mtime", "source_size"]
            assert data["feature"].dtype == np.float32 and data["feature"].shape == (768,)
            assert str(data["encoder"]) == encoder_id
            assert int(data["source_size"]) == image.stat().st_size
            assert float(data["source_mtime"]) == image.stat().st_mtime
            np.testing.assert_allclose(data["feature"], expected, atol=1e-5)
    assert not list((tmp_path / "data").glob(".*tmp*"))  # no temporary files left behind


def test_resume_skips_valid_caches_and_recomputes_stale_ones(tiny_tagger, tiny_tagger_nchw, tmp_path, capsys):
    images = _make_images(tmp_path / "data", 4)
    caches = [feature_cache_path(p, tmp_path / "cache") for p in images]
    args = ["--train_data_dir", tmp_path / "data", "--cache_dir", tmp_path / "cache", "--tagger_model", tiny_tagger]
    assert _run(capsys, *args)[0] == 0
    stamps = [c.stat().st_mtime_ns for c in caches]

    code, out = _run(capsys, *args)
    assert code == 0 and "0 written, 4 skipped (valid cache)" in out
    assert [c.stat().st_mtime_ns for c in caches] == stamps

    caches[1].unlink()  # an interrupted run: one cache never written
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(images[2])  # an image edited since
    os.utime(images[2], ns=(0, images[2].stat().st_mtime_ns + 10**9))
    code, out = _run(capsys, *args)
    assert code == 0 and "2 written, 2 skipped (valid cache)" in out
    assert caches[0].stat().st_mtime_ns == stamps[0] and caches[3].stat().st_mtime_ns == stamps[3]
    np.testing.assert_allclose(read_feature(caches[2]), _direct_vectors(tiny_tagger, [images[2]])[0], atol=1e-5)

    code, out = _run(capsys, *args[:-1], tiny_tagger_nchw)  # another encoder: everything is stale
    assert code == 0 and "4 written, 0 skipped" in out
    assert read_feature(caches[0]).shape == (1024,)


def test_bad_images_are_reported_and_skipped(tiny_tagger, tmp_path, capsys):
    images = _make_images(tmp_path / "data", 7)
    (tmp_path / "data" / "zero.png").write_bytes(b"")
    (tmp_path / "data" / "notes.jpg").write_text("not an image")
    good = images[0].read_bytes()
    (tmp_path / "data" / "cut.jpg").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "img0.png")  # same stem as img0.jpg

    # batches of 2: cut img1 | img2 img3 | img4 img5 | img6 notes | zero: gaps, and the first batch buffer reused
    code, out = _run(capsys, "--train_data_dir", tmp_path / "data", "--tagger_model", tiny_tagger, "--batch_size", "2")
    assert code == 1
    for name, reason in [("zero.png", "empty"), ("notes.jpg", "not an image"), ("cut.jpg", "truncated"), ("img0.png", "img0_pfg.npz")]:
        assert any(name in line and reason in line for line in out.splitlines()), (name, out)
    assert "6 written, 0 skipped (valid cache), 5 failed" in out
    assert sorted(p.name for p in (tmp_path / "data").glob("*_pfg.npz")) == [f"img{i}_pfg.npz" for i in range(1, 7)]
    for image, expected in zip(images[1:], _direct_vectors(tiny_tagger, images[1:])):
        np.testing.assert_allclose(read_feature(feature_cache_path(image)), expected, atol=1e-5)


def test_dataset_config_with_subset_cache_dirs(tiny_tagger_nchw, tmp_path, capsys):
    a = _make_images(tmp_path / "a", 2)
    b = _make_images(tmp_path / "b", 3)
    config = tmp_path / "dataset.toml"
    config.write_text(
        "[general]\nresolution = 512\n\n[[datasets]]\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(tmp_path / 'a').as_posix()}'\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(tmp_path / 'b').as_posix()}'\n"
        f"  cache_dir = '{(tmp_path / 'bcache').as_posix()}'\n"
    )
    code, out = _run(capsys, "--dataset_config", config, "--tagger_model", tiny_tagger_nchw)
    assert code == 0, out
    assert all(feature_cache_path(p).is_file() for p in a)
    assert all(feature_cache_path(p, tmp_path / "bcache").is_file() for p in b)
    np.testing.assert_allclose(read_feature(feature_cache_path(b[2], tmp_path / "bcache")),
                               _direct_vectors(tiny_tagger_nchw, [b[2]])[0], atol=1e-5)


def test_bad_arguments_are_one_line_errors(tmp_path):
    _make_images(tmp_path / "data", 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    missing = tmp_path / "no_such_tagger"
    result = subprocess.run(
        [sys.executable, "prepare_features.py", "--train_data_dir", str(tmp_path / "data"), "--tagger_model", str(missing)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(UserError, match="is not a folder"):
        prepare_features.main(["--train_data_dir", str(tmp_path / "nothing"), "--tagger_model", "x"])
    with pytest.raises(UserError, match="batch_size"):
        prepare_features.main(["--train_data_dir", str(tmp_path / "data"), "--tagger_model", "x", "--batch_size", "0"])


def test_feature_cache_validation(tmp_path):
    image = _make_images(tmp_path, 1)[0]
    cache = feature_cache_path(image)
    assert cache.name == "img0_pfg.npz" and load_valid_feature(cache, "enc:1", image) is None
    save_feature(cache, np.arange(4, dtype=np.float64), "enc:1", image)
    np.testing.assert_array_equal(load_valid_feature(cache, "enc:1", image), np.arange(4, dtype=np.float32))
    assert load_valid_feature(cache, "enc:2", image) is None
    image.write_bytes(image.read_bytes() + b"\0")
    assert load_valid_feature(cache, "enc:1", image) is None
    cache.write_bytes(b"broken")
    assert load_valid_feature(cache, "enc:1", image) is None
    with pytest.raises(UserError, match="unreadable"):
        read_feature(cache)
    with pytest.raises(UserError, match="missing"):
        read_feature(tmp_path / "nothing_pfg.npz")
    old_layout = tmp_path / "old_pfg.npz"  # no record of the image: never current, so never trusted silently
    np.savez(old_layout, feature=np.ones(4, dtype=np.float32), encoder=np.array("enc:1"))
    vector, encoder_id, current = read_cache(old_layout, image)
    assert vector.shape == (4,) and encoder_id == "enc:1" and not current
    assert load_valid_feature(old_layout, "enc:1", image) is None


def test_kohya_repeat_folders_and_pinned_encoder(tiny_tagger, tmp_path, capsys):
    images = _make_images(tmp_path / "train" / "10_alice", 2) + _make_images(tmp_path / "train" / "3_bob", 1)
    code, out = _run(capsys, "--train_data_dir", tmp_path / "train", "--tagger_model", tiny_tagger)
    assert code == 0, out
    assert all(feature_cache_path(p).is_file() for p in images)

    config = tmp_path / "pinned.toml"
    config.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{(tmp_path / 'train' / '3_bob').as_posix()}'\n"
                      "encoder = 'other.onnx:000000000000'\n")
    with pytest.raises(UserError, match="other.onnx:000000000000"):
        prepare_features.main(["--dataset_config", str(config), "--tagger_model", str(tiny_tagger)])


def test_cache_latents_are_the_trainers_caches(tiny_tagger, tiny_sd1, tmp_path, capsys, monkeypatch):
    """prepare_features --cache_latents writes exactly what train_pfg.py --cache_latents_to_disk looks
    for: the trainer's own job list (built as train_pfg.py builds it) is served from disk, and a changed
    image, VAE or bucket is recomputed."""
    import library.data.latents as latents
    from library.data.dataset import collect_items
    from library.data.dataset_config import DatasetDefaults, load_dataset_config
    from library.models.loading import load_sd_model
    from library.train.settings import TrainSettings

    images = []
    for i, (w, h) in enumerate([(128, 40), (40, 128), (80, 80)]):
        path = tmp_path / "data" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    config = tmp_path / "dataset.toml"
    config.write_text(
        "[general]\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 32\n\n"
        "[[datasets]]\nresolution = 64\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{(tmp_path / 'data').as_posix()}'\n  flip_aug = true\n"
        f"  cache_dir = '{(tmp_path / 'cache').as_posix()}'\n"
    )
    code, out = _run(capsys, "--dataset_config", config, "--tagger_model", tiny_tagger, "--cache_latents",
                     "--pretrained_model_name_or_path", tiny_sd1)
    assert code == 0, out
    assert "latents: 3 images have valid caches, 0 failed" in out

    settings = TrainSettings(pretrained_model_name_or_path=str(tiny_sd1), dataset_config=str(config))
    items, _ = collect_items(load_dataset_config(config, DatasetDefaults.from_settings(settings)), settings.pfg_prompt)
    assert len({item.assignment.bucket for item in items}) == 3  # three aspect ratios, three buckets
    jobs = [item.latent_job() for item in items]  # as train_pfg.py
    vae = load_sd_model(str(tiny_sd1)).vae
    encoded: list[int] = []
    real_encode = latents.encode_pixels
    monkeypatch.setattr(latents, "encode_pixels", lambda v, px: encoded.append(len(px)) or real_encode(v, px))

    cached = latents.cache_latents(jobs, vae, to_disk=True, progress=False)
    assert encoded == [] and len(cached) == 3
    for index, item in enumerate(items):
        assert item.latent_path.parent == tmp_path / "cache"
        lat, flipped = cached[index]
        assert flipped is not None and lat.shape[1:] == (item.assignment.bucket[1] // 8, item.assignment.bucket[0] // 8)

    Image.fromarray(np.zeros((40, 128, 3), np.uint8)).save(images[0])  # edited image: only that one
    os.utime(images[0], ns=(0, images[0].stat().st_mtime_ns + 10**9))
    latents.cache_latents(jobs, vae, to_disk=True, progress=False)
    assert encoded == [1, 1]  # its latents and its flipped latents

    encoded.clear()
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)  # another VAE: everything
    latents.cache_latents(jobs, vae, to_disk=True, progress=False)
    assert sum(encoded) == 6

    other = items[2].assignment.__class__((64, 96), (64, 96), (0, 0, 64, 96))  # another bucket for the same image
    vid = latents.vae_id(vae)
    assert latents.load_valid_latents(items[2].latent_path, items[2].assignment, images[2], vid, True) is not None
    assert latents.load_valid_latents(items[2].latent_path, other, images[2], vid, True) is None


def test_processes_split_the_images_without_overlap(tiny_tagger, tmp_path, capsys, monkeypatch):
    """Under accelerate launch / torchrun every process runs prepare_features.py with its own RANK in a
    shared WORLD_SIZE: together they cover every image exactly once, and each exit code speaks for its share."""
    images = _make_images(tmp_path / "data", 5)
    (tmp_path / "data" / "x_broken.jpg").write_text("not an image")  # sorted: img0..img4, x_broken -> ranks 0,1,0,1,0,1
    args = ["--train_data_dir", tmp_path / "data", "--tagger_model", tiny_tagger, "--batch_size", "2"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    written: dict[str, set[str]] = {}
    codes, outs = {}, {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        before = {p.name for p in (tmp_path / "data").glob("*_pfg.npz")}
        codes[rank], outs[rank] = _run(capsys, *args)
        written[rank] = {p.name for p in (tmp_path / "data").glob("*_pfg.npz")} - before
    assert written["0"] == {"img0_pfg.npz", "img2_pfg.npz", "img4_pfg.npz"}
    assert written["1"] == {"img1_pfg.npz", "img3_pfg.npz"}
    assert codes == {"0": 0, "1": 1}  # the broken file is rank 1's
    assert "3 images in the share of process 0 of 2, 0 with a valid cache, 3 to encode" in outs["0"] and "3 written, 0 skipped (valid cache), 0 failed" in outs["0"]
    assert "x_broken.jpg" in outs["1"] and "2 written, 0 skipped (valid cache), 1 failed" in outs["1"]
    assert "x_broken.jpg" not in outs["0"]
    direct = _direct_vectors(tiny_tagger, images)
    for image, expected in zip(images, direct):
        np.testing.assert_allclose(read_feature(feature_cache_path(image)), expected, atol=1e-5)

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").glob("*_pfg.npz")}
    monkeypatch.setenv("RANK", "0")
    feature_cache_path(images[1]).unlink()  # rank 1's image: rank 0 must not take it over
    code, out = _run(capsys, *args)
    assert code == 0 and "0 written, 3 skipped (valid cache), 0 failed" in out and not feature_cache_path(images[1]).exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.exists())


def test_hub_id_is_downloaded_through_huggingface_hub(tiny_tagger, tmp_path, capsys, monkeypatch):
    """A hub id goes through huggingface_hub.hf_hub_download (here a stand-in serving the tiny tagger
    from a fake hub cache); the vectors and tags are those of the same model given as a folder."""
    import huggingface_hub

    requested: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        requested.append((repo_id, filename))
        snapshot = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abc"
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / filename).write_bytes((tiny_tagger / filename).read_bytes())
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    images = _make_images(tmp_path / "data", 2)
    code, out = _run(capsys, "--train_data_dir", tmp_path / "data", "--tagger_model", "SmilingWolf/wd-tiny-test",
                     "--write_tags", "--tag_threshold", "0.5")
    assert code == 0, out
    assert requested == [("SmilingWolf/wd-tiny-test", "model.onnx"), ("SmilingWolf/wd-tiny-test", "selected_tags.csv")]
    assert "2 written" in out and "captions: 2 written" in out  # selected_tags.csv found beside the downloaded model
    local_id = load_encoder(str(tiny_tagger)).encoder_id
    for image, expected in zip(images, _direct_vectors(tiny_tagger, images)):
        vector, encoder_id, current = read_cache(feature_cache_path(image), image)
        assert encoder_id == local_id and current
        np.testing.assert_allclose(vector, expected, atol=1e-5)


def test_hub_id_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """No network and nothing in the hub cache: one `error:` line naming the id, exit status 2."""
    import huggingface_hub.constants

    from library.errors import run_cli

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    _make_images(tmp_path / "data", 1)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: prepare_features.main(["--train_data_dir", str(tmp_path / "data"), "--tagger_model", "SmilingWolf/wd-not-cached"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: tagger model 'SmilingWolf/wd-not-cached'") and "could not be downloaded" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="session")
def tiny_tagger_v3(kit_dir):
    return build_tiny_tagger(kit_dir / "tiny-tagger-v3", seed=2, family="v3-matmul")


def test_matmul_add_sigmoid_head_is_found(tiny_tagger_v3, tmp_path, capsys):
    """A timm-style head (MatMul + Add + Sigmoid, no Gemm): the pooled vector is the classifier MatMul's
    data input, found without --feature_tensor, and the caches equal a direct onnxruntime run of it."""
    model = onnx.load(str(tiny_tagger_v3 / "model.onnx"))
    assert [n.op_type for n in model.graph.node[-3:]] == ["MatMul", "Add", "Sigmoid"]  # no Gemm in the head
    classifier = model.graph.node[-3]
    weights = {t.name for t in model.graph.initializer}
    pooled = next(i for i in classifier.input if i not in weights)
    assert find_pooled_tensor(model) == pooled

    images = _make_images(tmp_path / "data", 3)
    code, out = _run(capsys, "--train_data_dir", tmp_path / "data", "--tagger_model", tiny_tagger_v3)
    assert code == 0 and "3 written" in out and "D=1024" in out, out
    model.graph.output.append(onnx.helper.make_tensor_value_info(pooled, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    encoder = load_encoder(str(tiny_tagger_v3))
    batch = np.stack([encoder.preprocess(load_image(p)) for p in images])
    (direct,) = session.run([pooled], {"input": batch})
    for image, expected in zip(images, direct):
        np.testing.assert_allclose(read_feature(feature_cache_path(image)), expected, atol=1e-5)

    # --feature_tensor names the tensor by hand: another encoder id, so every cache is recomputed
    code, out = _run(capsys, "--train_data_dir", tmp_path / "data", "--tagger_model", tiny_tagger_v3, "--feature_tensor", pooled)
    assert code == 0 and "3 written, 0 skipped" in out, out
    for image, expected in zip(images, direct):
        vector, encoder_id, _ = read_cache(feature_cache_path(image))
        assert encoder_id.endswith(f"#{pooled}")
        np.testing.assert_allclose(vector, expected, atol=1e-5)


def test_real_world_image_kinds_are_all_written(tiny_tagger, tmp_path, capsys):
    """Every usable kind goes through the pipeline; an animation (WebP or GIF) gives the vector of its first frame."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(7)
    first = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    second = Image.fromarray(255 - np.asarray(first))
    first.save(data / "first_frame.png")
    first.save(data / "anim_webp.webp", save_all=True, append_images=[second], duration=80, lossless=True)
    palette_first = first.quantize(64)
    palette_first.save(data / "palette_first.png")
    palette_first.save(data / "anim_gif.gif", save_all=True, append_images=[second.quantize(64)], duration=80)
    first.convert("CMYK").save(data / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65536, (30, 20))).astype(np.uint16)).save(data / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    first.save(data / "rotated.jpg", exif=exif)
    Image.new("RGBA", (1, 1), (10, 20, 30, 0)).save(data / "tiny_clear.png")
    assert Image.open(data / "anim_webp.webp").n_frames == 2 and Image.open(data / "anim_gif.gif").n_frames == 2

    code, out = _run(capsys, "--train_data_dir", data, "--tagger_model", tiny_tagger)
    assert code == 0 and "8 written, 0 skipped (valid cache), 0 failed" in out, out
    vec = {p.stem: read_feature(feature_cache_path(p)) for p in data.iterdir() if p.suffix in (".png", ".jpg", ".webp", ".gif")}
    np.testing.assert_allclose(vec["anim_webp"], vec["first_frame"], atol=1e-6)  # lossless WebP: the same pixels
    np.testing.assert_allclose(vec["anim_gif"], vec["palette_first"], atol=1e-6)
    assert np.abs(vec["anim_webp"] - _direct_vectors(tiny_tagger, [data / "first_frame.png"])[0]).max() < 1e-5


def test_progress_shows_the_rate_and_time_left_and_failures_keep_their_own_lines(tiny_tagger, tmp_path):
    """The bar (stderr) shows images/s and the time left; a failure line (stdout) clears the bar
    first, so on a terminal, where both meet, it starts a line of its own instead of trailing it."""
    images = _make_images(tmp_path / "data", 4)
    (tmp_path / "data" / "img1b_broken.jpg").write_text("not an image")  # sorted second: the bar is on screen
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "prepare_features.py", "--train_data_dir", str(tmp_path / "data"), "--tagger_model",
                             str(tiny_tagger), "--batch_size", "1", "--num_workers", "1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:]
    out = result.stdout
    assert "encoding:" in out and " images/s" in out and " left]" in out and f"/{len(images) + 1} [" in out
    at = out.index("failed: ")
    assert out[at - 1] in "\r\n" and out[:at].rstrip(" \r").endswith(("]", "\n")) and "img1b_broken.jpg: not an image" in out
    assert "4 written, 0 skipped (valid cache), 1 failed" in out


def test_recursive_takes_the_images_of_subfolders(tiny_tagger, tmp_path, capsys):
    """--recursive (kohya's tagger flag) with --train_data_dir: every folder below, each with its own
    index, hidden folders left out; without it only the folder itself. Refused with a dataset TOML."""
    top = _make_images(tmp_path / "data", 1)
    nested = _make_images(tmp_path / "data" / "a", 2) + _make_images(tmp_path / "data" / "a" / "b", 1)
    hidden = _make_images(tmp_path / "data" / ".thumbnails", 1)
    code, out = _run(capsys, "--train_data_dir", tmp_path / "data", "--tagger_model", tiny_tagger)
    assert code == 0 and "1 written" in out
    code, out = _run(capsys, "--train_data_dir", tmp_path / "data", "--tagger_model", tiny_tagger, "--recursive")
    assert code == 0 and "3 written, 1 skipped (valid cache)" in out, out
    assert all(feature_cache_path(p).is_file() for p in top + nested) and not feature_cache_path(hidden[0]).exists()
    assert all((folder / ".pfg_index.bin").is_file() for folder in (tmp_path / "data", tmp_path / "data" / "a", tmp_path / "data" / "a" / "b"))
    config = tmp_path / "d.toml"
    config.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{(tmp_path / 'data').as_posix()}'\n")
    with pytest.raises(UserError, match="--recursive applies to --train_data_dir"):
        prepare_features.main(["--dataset_config", str(config), "--tagger_model", str(tiny_tagger), "--recursive"])


def test_a_rerun_over_a_finished_folder_opens_no_cache(tiny_tagger, tiny_sd1, tmp_path, capsys, monkeypatch):
    """With the folder index written by the first run, the second one knows every feature and
    latent cache valid from one directory scan and their stats: it opens none of them."""
    import library.data.latents as latents
    import library.prepare.run as run

    _make_images(tmp_path / "data", 3)
    args = ["--train_data_dir", tmp_path / "data", "--tagger_model", tiny_tagger, "--cache_latents",
            "--pretrained_model_name_or_path", tiny_sd1, "--resolution", "64"]
    assert _run(capsys, *args)[0] == 0
    opened: list = []
    for module, name in ((run, "read_cache"), (latents, "latent_cache_matches")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, **k: opened.append(a) or real(*a, **k))
    code, out = _run(capsys, *args)
    assert code == 0 and "0 written, 3 skipped (valid cache)" in out and "latents: 3 images have valid caches" in out
    assert opened == []
