"""The dataset TOML: fallbacks, kohya compatibility, and errors that name file, table and key."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import pytest

from library.data.dataset_config import (
    DatasetDefaults,
    UnsupportedKeyWarning,
    config_from_train_data_dir,
    load_dataset_config,
)
from library.errors import UserError

REPO = Path(__file__).resolve().parent.parent
S2 = "[[datasets]] #1 > [[datasets.subsets]] #2"


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working directory with image folders a, b, c (relative paths resolve against it)."""
    for name in ("a", "b", "c"):
        (tmp_path / "img" / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(folder: Path, text: str, name: str = "dataset.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_quietly(path, defaults=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedKeyWarning)
        return load_dataset_config(path, defaults)


def test_values_fall_back_subset_dataset_general_command_line(work):
    path = write(work, """
[general]
keep_tokens = 1
caption_extension = ".txt"
shuffle_caption = true
encoder = "wd-vit:abc"

[[datasets]]
resolution = 768
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "img/a"
  keep_tokens = 3
  num_repeats = 10
  cache_dir = "cache/a"

  [[datasets.subsets]]
  image_dir = "img/b"
  is_reg = true

[[datasets]]
resolution = [512, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = "img/c"
  class_tokens = "sks girl"
""")
    defaults = DatasetDefaults(batch_size=3, num_repeats=4, keep_tokens=5, flip_aug=True,
                               pfg_prompt="illustration of *")
    config = load_dataset_config(path, defaults)
    d1, d2 = config.datasets
    a, b = d1.subsets
    (c,) = d2.subsets
    assert config.pfg_prompt == "illustration of *"
    assert (a.keep_tokens, b.keep_tokens, c.keep_tokens) == (3, 2, 1)  # subset, dataset, general
    assert (a.num_repeats, b.num_repeats, c.num_repeats) == (10, 4, 4)  # subset, command line
    assert (d1.batch_size, d2.batch_size) == (3, 2)
    assert (d1.resolution, d2.resolution) == ((768, 768), (512, 768))
    assert all(s.caption_extension == ".txt" and s.shuffle_caption and s.flip_aug for s in (a, b, c))
    assert all(s.encoder == "wd-vit:abc" for s in (a, b, c))
    assert (a.is_reg, b.is_reg, c.class_tokens, a.class_tokens) == (False, True, "sks girl", None)
    assert a.image_dir == work / "img" / "a" and a.cache_dir == work / "cache" / "a" and b.cache_dir is None
    assert a.sources["keep_tokens"] == a.name and b.sources["keep_tokens"] == "[[datasets]] #1"
    assert c.sources["keep_tokens"] == "[general]" and a.sources["flip_aug"].startswith("command line")
    assert d1.enable_bucket is False and d1.bucket_reso_steps == 64  # kohya's defaults
    assert [s.name for _, s in config.iter_subsets()] == [
        "[[datasets]] #1 > [[datasets.subsets]] #1", S2, "[[datasets]] #2 > [[datasets.subsets]] #1"]
    assert config.to_dict()["datasets"][0]["subsets"][0]["image_dir"] == str(work / "img" / "a")


KOHYA_FILE = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
color_aug = false
caption_prefix = "masterpiece, "
token_warmup_step = 0

[[datasets]]
resolution = 512
batch_size = 4
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
bucket_no_upscale = false
network_multiplier = 1.0

  [[datasets.subsets]]
  image_dir = "img/a"
  class_tokens = "shs girl"
  num_repeats = 10
  flip_aug = true
  random_crop = true
  caption_dropout_rate = 0.05
  caption_tag_dropout_rate = 0.1
  caption_dropout_every_n_epochs = 0
  face_crop_aug_range = [2.0, 4.0]
  alpha_mask = false

  [[datasets.subsets]]
  is_reg = true
  image_dir = "img/b"
  class_tokens = "girl"
  keep_tokens = 0
  color_aug = true
  cache_info = true
"""


def test_real_kohya_file_loads_with_one_warning_per_unimplemented_key(work):
    path = write(work, KOHYA_FILE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_dataset_config(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnsupportedKeyWarning)]
    expected = {"color_aug", "caption_prefix", "token_warmup_step", "network_multiplier", "random_crop",
                "caption_tag_dropout_rate", "caption_dropout_every_n_epochs", "face_crop_aug_range",
                "alpha_mask", "cache_info"}
    (reg,) = [m for m in messages if "is_reg = true" in m]  # regularisation images: said, not silently trained
    assert S2 in reg and "img/b" in reg and "no prior-preservation loss" in reg
    messages.remove(reg)
    assert len(messages) == len(caught) - 1 == len(expected)  # color_aug is in two tables: still one warning
    for key in expected:
        (message,) = [m for m in messages if f"'{key}'" in m]
        assert str(path) in message
    (color,) = [m for m in messages if "'color_aug'" in m]
    assert "[general]" in color and S2 in color
    assert config.ignored_keys == (*messages, reg)
    d = config.datasets[0]
    assert (d.resolution, d.batch_size, d.enable_bucket) == ((512, 512), 4, True)
    a, b = d.subsets
    assert (a.num_repeats, a.flip_aug, a.caption_dropout_rate, a.keep_tokens) == (10, True, 0.05, 1)
    assert (b.is_reg, b.class_tokens, b.keep_tokens, b.num_repeats) == (True, "girl", 0, 1)


BASE = """
[[datasets]]
{dataset}
  [[datasets.subsets]]
  image_dir = "img/a"
  [[datasets.subsets]]
  image_dir = "img/b"
{subset}
"""

ERRORS = [  # (general, dataset, second subset, expected fragments besides the file name)
    ("", "", "num_repeat = 3", [S2, "'num_repeat'", "did you mean 'num_repeats'"]),
    ("", "", "shufle_caption = true", [S2, "'shufle_caption'", "did you mean 'shuffle_caption'"]),
    ("", "batch_size = \"4\"", "", ["[[datasets]] #1:", "'batch_size'", "integer", '"4"']),
    ("", "", "flip_aug = 1", [S2, "'flip_aug'", "true or false"]),
    ("", "resolution = \"512\"", "", ["[[datasets]] #1:", "'resolution'", "[width, height]"]),
    ("", "", "num_repeats = -2", [S2, "'num_repeats'", "at least 1"]),
    ("", "", "keep_tokens = -1", [S2, "'keep_tokens'"]),
    ("", "", "caption_dropout_rate = 1.5", [S2, "'caption_dropout_rate'", "between 0 and 1"]),
    ("", "", "caption_extension = \"txt\"", [S2, "'caption_extension'", "'.txt'"]),
    ("", "resolution = 500", "", ["[[datasets]] #1:", "'resolution'", "multiples of 8"]),
    ("", "batch_size = 0", "", ["[[datasets]] #1:", "'batch_size'"]),
    ("", "enable_bucket = true\nresolution = [512, 520]", "",
     ["[[datasets]] #1:", "'resolution'", "bucket_reso_steps"]),
    ("", "enable_bucket = true\nbucket_reso_steps = 12", "", ["[[datasets]] #1:", "'bucket_reso_steps'"]),
    ("min_bucket_reso = 1024\nmax_bucket_reso = 512", "enable_bucket = true", "",
     ["[[datasets]] #1:", "'min_bucket_reso' (set in [general])", "'max_bucket_reso' (set in [general])"]),
    ("", "enable_bucket = true\nmax_bucket_reso = 384", "", ["[[datasets]] #1:", "'max_bucket_reso'", "512x512"]),
    ("", "", "batch_size = 2", [S2, "'batch_size'", "dataset setting"]),
    ("image_dir = \"img/c\"", "", "", ["[general]", "'image_dir'", "[[datasets.subsets]]"]),
    ("resolutoin = 512", "", "", ["[general]", "'resolutoin'", "did you mean 'resolution'"]),
    ("", "", "encoder = \" \"", [S2, "'encoder'"]),
]


@pytest.mark.parametrize("general,dataset,subset,fragments", ERRORS)
def test_errors_name_file_table_and_key(work, general, dataset, subset, fragments):
    text = ("[general]\n" + general + "\n" if general else "") + BASE.format(dataset=dataset, subset=subset)
    path = write(work, text)
    with pytest.raises(UserError) as e:
        load_quietly(path)
    message = str(e.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_and_nonexistent_image_dir(work):
    path = write(work, """
[[datasets]]
  [[datasets.subsets]]
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "img/nope"
""")
    with pytest.raises(UserError) as e:
        load_quietly(path)
    message = str(e.value)
    assert "2 problems" in message
    assert f"{path}: [[datasets]] #1 > [[datasets.subsets]] #1: missing required key 'image_dir'" in message
    assert f"{path}: {S2}: 'image_dir' = 'img/nope' does not exist" in message


def test_relative_image_dir_hint_when_it_exists_beside_the_config(work, tmp_path_factory, monkeypatch):
    path = write(work, BASE.format(dataset="", subset=""))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    with pytest.raises(UserError) as e:
        load_quietly(path)
    assert "relative to the config file" in str(e.value) and str(work / "img" / "a") in str(e.value)


def test_structure_errors(work):
    for text, fragment in [
        ("[datasets]\nresolution = 512\n", "'datasets' must be an array of tables"),
        ("[[datasets]]\nresolution = 512\n", "[[datasets]] #1: no [[datasets.subsets]]"),
        ("[general]\nresolution = 512\n", "no [[datasets]] table"),
        ("resolution = 512\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img/a'\n", "move it to [general]"),
        ("[[dataset]]\n[[dataset.subsets]]\nimage_dir = 'img/a'\n", "did you mean 'datasets'"),
    ]:
        with pytest.raises(UserError) as e:
            load_quietly(write(work, text))
        assert fragment in str(e.value) and "dataset.toml" in str(e.value)


def test_toml_syntax_error_names_file_and_line(work):
    path = write(work, "[general]\nshuffle_caption = true\nkeep_tokens = = 2\n")
    with pytest.raises(UserError) as e:
        load_dataset_config(path)
    assert f"{path}:3: TOML syntax error" in str(e.value) and "keep_tokens = = 2" in str(e.value)
    with pytest.raises(UserError, match="not found"):
        load_dataset_config(work / "missing.toml")


def test_bad_command_line_values_are_reported(work):
    path = write(work, BASE.format(dataset="", subset=""))
    with pytest.raises(UserError) as e:
        load_quietly(path, DatasetDefaults(batch_size=0, caption_dropout_rate=2.0))
    assert "'batch_size' (set in command line" in str(e.value)
    assert "'caption_dropout_rate' (set in command line" in str(e.value)


def test_defaults_from_settings_with_kohya_flag_names():
    settings = Namespace(train_batch_size=4, resolution="512,768", enable_bucket=True, pfg_prompt="p",
                         keep_tokens=None, unrelated=1)
    d = DatasetDefaults.from_settings(settings)
    assert (d.batch_size, d.resolution, d.enable_bucket, d.pfg_prompt, d.keep_tokens) == (4, (512, 768), True, "p", 0)
    with pytest.raises(UserError, match="--resolution"):
        DatasetDefaults.from_settings(Namespace(resolution="big"))


def test_train_data_dir_kohya_folder_convention(tmp_path):
    (tmp_path / "train" / "10_sks girl").mkdir(parents=True)
    (tmp_path / "train" / "notes").mkdir()
    (tmp_path / "train" / "2_style").mkdir()
    (tmp_path / "plain").mkdir()
    config = config_from_train_data_dir(tmp_path / "train", DatasetDefaults(resolution=(768, 768)),
                                        reg_data_dir=tmp_path / "plain")
    (d,) = config.datasets
    assert d.resolution == (768, 768)
    assert [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in d.subsets] == [
        ("10_sks girl", 10, "sks girl", False), ("2_style", 2, "style", False), ("plain", 1, None, True)]
    with pytest.raises(UserError, match="--train_data_dir"):
        config_from_train_data_dir(tmp_path / "nope")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "library.data.dataset_config", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_prints_resolved_config_and_fails_cleanly(work):
    good = write(work, KOHYA_FILE)
    out = run_cli(str(good), cwd=work)
    assert out.returncode == 0, out.stderr
    assert "[[datasets]] #1 > [[datasets.subsets]] #2" in out.stdout
    assert "resolution            512x512" in out.stdout
    assert f"image_dir             {work / 'img' / 'b'}" in out.stdout
    assert "keep_tokens           1  <- [general]" in out.stdout
    assert "min_bucket_reso       256\n" in out.stdout  # set in the dataset table: no arrow
    assert out.stderr.count("warning: ") == 11 and "'color_aug'" in out.stderr and "is_reg = true" in out.stderr

    bad = write(work, BASE.format(dataset="", subset="num_repeat = 3"), name="bad.toml")
    out = run_cli(str(bad), cwd=work)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert "bad.toml" in out.stderr and S2 in out.stderr and "did you mean 'num_repeats'" in out.stderr
