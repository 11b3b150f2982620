"""Tag captions: selection rules (kohya's), and --write_tags through prepare_features.py."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

import prepare_features
from library.models.image_encoders import load_encoder
from library.models.image_encoders.wd_tagger import find_pooled_tensor
from library.errors import UserError
from library.data.features import feature_cache_path, read_feature
from library.data.images import load_image
from library.data.tags import CaptionWriter, TagList, format_tag, load_tag_list, select_tags


def _tags() -> TagList:
    names = ("general", "sensitive", "long_hair", "^_^", "smile", "alice_(demo)", "bob_(demo)")
    return TagList(names, np.array([9, 9, 0, 0, 0, 4, 4]))


def test_selection_thresholds_order_and_underscores():
    probs = np.array([0.2, 0.7, 0.9, 0.5, 0.3, 0.86, 0.84])
    assert select_tags(probs, _tags(), 0.35, 0.85) == ["long hair", "^_^", "alice (demo)"]
    assert select_tags(probs, _tags(), 0.25, 0.8, include_rating=True) == ["sensitive", "long hair", "^_^", "smile", "alice (demo)", "bob (demo)"]
    assert select_tags(np.zeros(7), _tags(), 0.35, 0.85) == []
    assert format_tag("o_o") == "o_o" and format_tag("looking_at_viewer") == "looking at viewer"


def test_caption_writer_keeps_existing_files_unless_asked(tmp_path):
    image = tmp_path / "a.png"
    writer = CaptionWriter(_tags(), extension=".txt")
    probs = np.array([0.0, 0.0, 0.9, 0.0, 0.9, 0.0, 0.0])
    assert writer.write(image, probs) and (tmp_path / "a.txt").read_text() == "long hair, smile\n"
    (tmp_path / "a.txt").write_text("my own caption")
    assert not writer.write(image, probs) and (tmp_path / "a.txt").read_text() == "my own caption"
    overwriting = CaptionWriter(_tags(), extension=".caption", overwrite=True)
    (tmp_path / "a.caption").write_text("old")
    assert overwriting.write(image, probs) and (tmp_path / "a.caption").read_text() == "long hair, smile\n"
    assert not list(tmp_path.glob(".*tmp*"))


def test_bad_tag_csv_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="selected_tags.csv"):
        load_tag_list(tmp_path / "selected_tags.csv")
    (tmp_path / "bad.csv").write_text("id,label\n1,x\n")
    with pytest.raises(UserError, match="bad.csv"):
        load_tag_list(tmp_path / "bad.csv")


def _direct_probs(tagger, images):
    """Probabilities by hand: plain onnxruntime on the stock graph's output 0."""
    model = onnx.load(str(tagger / "model.onnx"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    encoder = load_encoder(str(tagger))
    batch = np.stack([encoder.preprocess(load_image(p)) for p in images])
    return session.run([model.graph.output[0].name], {session.get_inputs()[0].name: batch})[0]


def test_write_tags_from_the_same_forward_pass(tiny_tagger, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    images = []
    for i in range(3):
        path = folder / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (60 + 10 * i, 50, 3), dtype=np.uint8)).save(path)
        images.append(path)
    (folder / "img2.txt").write_text("hand written\n")
    args = ["--train_data_dir", str(folder), "--tagger_model", str(tiny_tagger), "--write_tags", "--tag_threshold", "0.5",
            "--character_threshold", "0.5", "--batch_size", "2"]
    assert prepare_features.main(args) == 0
    out = capsys.readouterr().out
    assert "3 written" in out and "captions: 2 written, 1 kept" in out

    tags = load_tag_list(tiny_tagger / "selected_tags.csv")
    probs = _direct_probs(tiny_tagger, images)
    for image, row in zip(images[:2], probs):
        expected = select_tags(row, tags, 0.5, 0.5)
        assert expected, "the random tagger should pass some tags at 0.5"
        assert image.with_suffix(".txt").read_text() == ", ".join(expected) + "\n"
        assert not {"general", "sensitive", "questionable", "explicit"} & set(expected)
    assert images[2].with_suffix(".txt").read_text() == "hand written\n"

    # rerun: nothing to do; then a deleted caption reruns only that image (its feature is rewritten too)
    assert prepare_features.main(args) == 0
    assert "0 to encode" in capsys.readouterr().out
    images[0].with_suffix(".txt").unlink()
    assert prepare_features.main(args + ["--include_rating"]) == 0
    assert "1 to encode" in capsys.readouterr().out
    first = images[0].with_suffix(".txt").read_text().split(", ")[0]
    assert first in {"general", "sensitive", "questionable", "explicit"}
    assert read_feature(feature_cache_path(images[0])).shape == (768,)

    assert prepare_features.main(args + ["--overwrite_captions"]) == 0
    assert "captions: 3 written" in capsys.readouterr().out
    assert images[2].with_suffix(".txt").read_text() != "hand written\n"


def test_write_tags_needs_a_probabilities_output(tiny_tagger, tmp_path):
    src = tiny_tagger / "model.onnx"
    features_only = tmp_path / "features.onnx"
    onnx.utils.extract_model(str(src), str(features_only), ["input_1:0"], [find_pooled_tensor(onnx.load(str(src)))])
    (tmp_path / "data").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "data" / "a.png")
    with pytest.raises(UserError, match="probabilities"):
        prepare_features.main(["--train_data_dir", str(tmp_path / "data"), "--tagger_model", str(features_only), "--write_tags"])
