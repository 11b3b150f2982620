"""Robust image loading, exact WD preprocessing, and the ONNX graph edit."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from library.models.image_encoders import ImageEncoder, load_encoder
from library.models.image_encoders.wd_tagger import find_pooled_tensor, wd_preprocess
from library.errors import UserError
from library.data.images import ImageLoadError, list_images, load_image


# --- a straightforward reference: SmilingWolf's steps, with the padding done in numpy as kohya does

def reference_rgb(path) -> np.ndarray:
    im = Image.open(path)
    if im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA") if "transparency" in im.info or "A" in im.mode else im.convert("RGB")
    if im.mode == "RGBA":
        canvas = Image.new("RGBA", im.size, (255, 255, 255))
        canvas.alpha_composite(im)
        im = canvas.convert("RGB")
    return np.asarray(im)


def reference_wd(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = np.pad(rgb, ((top, side - h - top), (left, side - w - left), (0, 0)), constant_values=255)
    im = Image.fromarray(padded)
    if side != size:
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im).astype(np.float32)[:, :, ::-1]


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _write(tmp_path, name: str, image: Image.Image, **save) -> str:
    path = tmp_path / name
    image.save(path, **save)
    return path


def _mode_images(tmp_path, h: int, w: int):
    rgb = _pattern(h, w, seed=h * 7 + w)
    alpha = np.random.default_rng(1).integers(0, 256, size=(h, w), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 3
    yield _write(tmp_path, f"rgb_{h}x{w}.png", Image.fromarray(rgb))
    yield _write(tmp_path, f"rgba_{h}x{w}.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    yield _write(tmp_path, f"l_{h}x{w}.png", Image.fromarray(rgb[..., 0], "L"))
    yield _write(tmp_path, f"la_{h}x{w}.png", Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"))
    yield _write(tmp_path, f"p_{h}x{w}.png", palette, transparency=3)
    yield _write(tmp_path, f"cmyk_{h}x{w}.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)


@pytest.mark.parametrize("h,w", [(300, 200), (200, 300), (600, 500), (500, 600), (448, 448), (1, 3)])
def test_wd_preprocessing_is_pixel_exact(tmp_path, h, w):
    for path in _mode_images(tmp_path, h, w):
        loaded = load_image(path)
        assert loaded.mode == "RGB"
        expected_rgb = reference_rgb(path)
        np.testing.assert_array_equal(np.asarray(loaded), expected_rgb, err_msg=str(path))
        got = wd_preprocess(loaded, 448)
        assert got.dtype == np.float32 and got.shape == (448, 448, 3)
        np.testing.assert_array_equal(got, reference_wd(expected_rgb, 448), err_msg=str(path))
        nchw = wd_preprocess(loaded, 448, layout="NCHW")
        np.testing.assert_array_equal(nchw, got.transpose(2, 0, 1))


def test_sixteen_bit_png_keeps_its_full_range(tmp_path):
    values = np.arange(256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values * 257).save(path)  # 0..65535
    assert Image.open(path).mode.startswith("I")
    loaded = np.asarray(load_image(path))
    np.testing.assert_array_equal(loaded, np.repeat(values.astype(np.uint8)[..., None], 3, axis=2))


def test_exif_rotation_is_applied(tmp_path):
    im = Image.fromarray(_pattern(40, 80, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif)
    assert load_image(path).size == (40, 80)


def test_animation_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert np.asarray(load_image(path))[5, 5].tolist() == [255, 0, 0]


def test_preprocess_composites_rgba_images_on_white():
    clear = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert (wd_preprocess(clear, 32) == 255).all()


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("zero.png", b"", "empty file"),
        ("text.jpg", b"hello, I am not a picture", "not an image"),
        ("truncated.png", None, "truncated"),
    ],
)
def test_bad_files_raise_image_load_error_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is None:
        buf = io.BytesIO()
        Image.fromarray(_pattern(64, 64, 3)).save(buf, format="PNG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.path == path and reason in info.value.reason and name in str(info.value)


def test_decompression_bomb_guard(tmp_path):
    path = _write(tmp_path, "big.png", Image.new("RGB", (100, 100)))
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(path, max_pixels=5_000)


def test_list_images_is_sorted_and_filters_extensions(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.txt", "d_pfg.npz", "e.webp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.png").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "e.webp"]
    assert [p.name for p in list_images(tmp_path, recursive=True)][-1] == "f.png"


# --- the graph edit


def _edited_session(model_path, tensor: str) -> ort.InferenceSession:
    """Independent graph edit for comparison: expose `tensor` as an output and run it."""
    model = onnx.load(str(model_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_pooled_tensor_is_the_classifier_input(tiny_tagger):
    model = onnx.load(str(tiny_tagger / "model.onnx"))
    name = find_pooled_tensor(model)
    classifier = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    assert name == classifier.input[0]
    encoder = load_encoder(str(tiny_tagger))
    assert isinstance(encoder, ImageEncoder)
    assert encoder.dim == 768 and encoder.size == 448 and encoder.layout == "NHWC"
    assert encoder.encoder_id.startswith("model.onnx:") and len(encoder.encoder_id.split(":")[1]) == 12

    images = [Image.fromarray(_pattern(50 + 30 * i, 70, i)) for i in range(3)]
    batch = np.stack([encoder.preprocess(im) for im in images])
    (direct,) = _edited_session(tiny_tagger / "model.onnx", name).run([name], {"input_1:0": batch})
    np.testing.assert_allclose(encoder.encode(images), direct, atol=1e-6)


def test_feature_tensor_override_and_features_only_model(tiny_tagger, tmp_path):
    src = tiny_tagger / "model.onnx"
    pooled = find_pooled_tensor(onnx.load(str(src)))
    x = np.random.default_rng(0).uniform(0, 255, (2, 448, 448, 3)).astype(np.float32)
    reference = load_encoder(str(tiny_tagger)).encode_batch(x)

    named = load_encoder(str(src), feature_tensor=pooled)
    assert named.encoder_id.endswith(f"#{pooled}")
    np.testing.assert_allclose(named.encode_batch(x), reference, atol=1e-6)

    features_only = tmp_path / "features.onnx"
    onnx.utils.extract_model(str(src), str(features_only), ["input_1:0"], [pooled])
    only = load_encoder(str(features_only))
    assert only.dim == 768
    np.testing.assert_allclose(only.encode_batch(x), reference, atol=1e-6)

    with pytest.raises(UserError, match="no_such_tensor"):
        load_encoder(str(src), feature_tensor="no_such_tensor")


def test_bad_tagger_specs_are_clear_user_errors(tmp_path):
    with pytest.raises(UserError, match="missing_tagger"):
        load_encoder(str(tmp_path / "missing_tagger"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no model.onnx"):
        load_encoder(str(tmp_path / "empty"))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"garbage")
    with pytest.raises(UserError, match="broken.onnx"):
        load_encoder(str(broken))
    with pytest.raises(UserError, match="some-owner/some-tagger"):  # offline in tests: no download
        load_encoder("some-owner/some-tagger")


def test_cuda_request_falls_back_to_cpu_when_unavailable(tiny_tagger, capsys):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    encoder = load_encoder(str(tiny_tagger), device="cuda")
    assert encoder.provider == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in capsys.readouterr().out
