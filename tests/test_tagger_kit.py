"""The tiny WD-style taggers: real interface, exact pooled vector, any batch size."""
from __future__ import annotations

import csv

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from library.models.image_encoders import load_encoder
from tests.assertions import assert_same_tensors
from tools.make_tiny_tagger import build_tiny_tagger, load_torch_tagger


@pytest.fixture(scope="session")
def tiny_tagger_nchw(kit_dir):
    return build_tiny_tagger(kit_dir / "tiny-tagger-nchw", seed=1, family="nchw-1024")


def _random_batch(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=shape).astype(np.float32)


def test_default_tagger_has_the_wd_v2_interface(tiny_tagger):
    model = onnx.load(str(tiny_tagger / "model.onnx"))
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "input_1:0"
    assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [448, 448, 3]
    assert [o.name for o in model.graph.output] == ["predictions_sigmoid"]
    assert model.graph.node[-1].op_type == "Sigmoid"


def test_selected_tags_csv_has_the_real_columns(tiny_tagger):
    with open(tiny_tagger / "selected_tags.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["tag_id", "name", "category", "count"]
    categories = [r["category"] for r in rows]
    assert categories[:4] == ["9"] * 4 and [r["name"] for r in rows[:4]] == ["general", "sensitive", "questionable", "explicit"]
    assert "0" in categories and "4" in categories
    session = ort.InferenceSession(str(tiny_tagger / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape[-1] == len(rows)


@pytest.mark.parametrize("batch", [1, 3])
def test_any_batch_size_gives_probabilities_equal_to_torch(tiny_tagger, batch):
    session = ort.InferenceSession(str(tiny_tagger / "model.onnx"), providers=["CPUExecutionProvider"])
    x = _random_batch((batch, 448, 448, 3), seed=batch)
    (probs,) = session.run(None, {"input_1:0": x})
    with torch.no_grad():
        expected = load_torch_tagger(tiny_tagger)(torch.from_numpy(x)).numpy()
    assert probs.shape == expected.shape and ((probs > 0) & (probs < 1)).all()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


@pytest.mark.parametrize("family", ["default", "nchw"])
def test_onnx_pooled_vector_equals_torch_pooled_vector(request, family):
    folder = request.getfixturevalue("tiny_tagger" if family == "default" else "tiny_tagger_nchw")
    torch_model = load_torch_tagger(folder)
    encoder = load_encoder(str(folder))
    cfg = torch_model.cfg
    shape = (3, cfg.image_size, cfg.image_size, 3) if cfg.layout == "NHWC" else (3, 3, cfg.image_size, cfg.image_size)
    x = _random_batch(shape)
    with torch.no_grad():
        expected = torch_model.pooled(torch.from_numpy(x)).numpy()
    got = encoder.encode_batch(x)
    assert got.shape == (3, cfg.embed_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_second_family_has_another_interface(tiny_tagger_nchw):
    session = ort.InferenceSession(str(tiny_tagger_nchw / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.shape[1:] == [3, 384, 384]
    encoder = load_encoder(str(tiny_tagger_nchw))
    assert (encoder.dim, encoder.layout, encoder.size) == (1024, "NCHW", 384)


def test_build_is_deterministic_and_idempotent(tiny_tagger, tmp_path):
    stamp = (tiny_tagger / "model.onnx").stat().st_mtime_ns
    assert build_tiny_tagger(tiny_tagger, seed=0) == tiny_tagger
    assert (tiny_tagger / "model.onnx").stat().st_mtime_ns == stamp  # marker: nothing rebuilt
    other = build_tiny_tagger(tmp_path / "again", seed=0)
    a = torch.load(tiny_tagger / "torch_model.pt", weights_only=True)
    b = torch.load(other / "torch_model.pt", weights_only=True)
    assert_same_tensors(a, b)
