"""The dataset TOML: fallbacks, kohya compatibility, and errors that name file, table and key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import pytest

from library.data.dataset_config import (
    AdjustedValueWarning,
    DatasetConfigWarning,
    DatasetDefaults,
    UnsupportedKeyWarning,
    config_from_train_data_dir,
    load_dataset_config,
)
from library.data.dataset_schema import NOT_APPLICABLE_SUBSET_ONLY_KEYS, SUBSET_ONLY_KEYS, TYPE_NAMES, TYPES
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
        warnings.simplefilter("ignore", DatasetConfigWarning)
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


def test_real_kohya_file_loads_and_keys_that_do_not_apply_warn_once_each(work):
    path = write(work, KOHYA_FILE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_dataset_config(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnsupportedKeyWarning)]
    (reg,) = [m for m in messages if "is_reg = true" in m]  # regularisation images: said, not silently trained
    assert S2 in reg and "img/b" in reg and "no prior-preservation loss" in reg
    messages.remove(reg)
    expected = {"network_multiplier": "--network_mul", "face_crop_aug_range": "random_crop works",
                "cache_info": "nothing to cache"}
    assert len(messages) == len(caught) - 1 == len(expected)
    for key, reason in expected.items():
        (message,) = [m for m in messages if f"'{key}'" in m]
        assert str(path) in message and "does not apply to PFG" in message and reason in message
    assert config.notes == (*messages, reg)
    d = config.datasets[0]
    assert (d.resolution, d.batch_size, d.enable_bucket) == ((512, 512), 4, True)
    a, b = d.subsets
    assert (a.num_repeats, a.flip_aug, a.caption_dropout_rate, a.keep_tokens) == (10, True, 0.05, 1)
    assert (b.is_reg, b.class_tokens, b.keep_tokens, b.num_repeats) == (True, "girl", 0, 1)
    # kohya's caption and augmentation keys are implemented: their values resolve like any other
    assert (a.caption_prefix, b.caption_prefix, a.token_warmup_step) == ("masterpiece, ", "masterpiece, ", 0.0)
    assert (a.random_crop, a.caption_tag_dropout_rate, a.alpha_mask, a.color_aug, b.color_aug) == (True, 0.1, False, False, True)
    assert a.caption_options.caption_prefix == "masterpiece, " and a.varies_pixels and not b.random_crop


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
    ("", "", "caption_extension = \"\"", [S2, "'caption_extension'", "'.txt'"]),
    ("", "resolution = 500", "", ["[[datasets]] #1:", "'resolution'", "multiples of 8"]),
    ("", "batch_size = 0", "", ["[[datasets]] #1:", "'batch_size'"]),
    ("", "", "resize_interpolation = \"fancy\"", [S2, "'resize_interpolation'", "lanczos, nearest"]),
    ("", "", "caption_separator = \"\"", [S2, "'caption_separator'", "is empty"]),
    ("", "", "caption_tag_dropout_rate = 2", [S2, "'caption_tag_dropout_rate'", "between 0 and 1"]),
    ("", "", "validation_split = 0.1", [S2, "'validation_split'", "dataset setting"]),
    ("", "validation_split = 1.0", "", ["[[datasets]] #1:", "'validation_split'", "[0, 1)"]),
    ("", "", "metadata_file = \"nowhere.json\"", [S2, "'metadata_file'", "not found"]),
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
    assert f"{'resolution':<30} 512x512" in out.stdout
    assert f"{'image_dir':<30} {work / 'img' / 'b'}" in out.stdout
    assert f"{'keep_tokens':<30} 1  <- [general]" in out.stdout
    assert f"{'min_bucket_reso':<30} 256\n" in out.stdout  # set in the dataset table: no arrow
    assert "caption_dropout_every_n_epochs 0\n" in out.stdout  # the longest key still leaves a space
    assert out.stderr.count("warning: ") == 4 and "'cache_info'" in out.stderr and "is_reg = true" in out.stderr

    bad = write(work, BASE.format(dataset="", subset="num_repeat = 3"), name="bad.toml")
    out = run_cli(str(bad), cwd=work)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert "bad.toml" in out.stderr and S2 in out.stderr and "did you mean 'num_repeats'" in out.stderr


# A wrong value for each kind of kohya's schema (kohya's `float` keys take no integers: 1 is wrong there).
WRONG = {"int": '"3"', "bool": "1", "number": '"0.1"', "float": "1", "str": "1", "pair": "[2, 4]", "table": "1",
         "resolution": '"512"'}


@pytest.mark.parametrize("key", sorted(TYPES))
def test_every_key_is_type_checked_as_kohyas_schema(work, key):
    """Implemented or not, every kohya key (and ours) with a wrong type is an error naming the file,
    the table and the key, in the table where the key belongs."""
    if key == "image_dir":
        text, table = f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = {WRONG['str']}\n", S2.replace("#2", "#1")
    elif key in SUBSET_ONLY_KEYS or key in NOT_APPLICABLE_SUBSET_ONLY_KEYS:
        text, table = BASE.format(dataset="", subset=f"{key} = {WRONG[TYPES[key]]}"), S2
    else:
        text, table = f"[general]\n{key} = {WRONG[TYPES[key]]}\n" + BASE.format(dataset="", subset=""), "[general]"
    path = write(work, text)
    with pytest.raises(UserError) as e:
        load_quietly(path)
    assert f"{path}: {table}: '{key}' must be {TYPE_NAMES[TYPES[key]]}" in str(e.value)


def test_kohyas_lenient_values_load_as_kohya_reads_them_with_a_warning_each(work):
    """A caption_extension without its dot, num_repeats = 0, bucket limits and a resolution off the
    bucket_reso_steps grid, and the same image_dir twice in a dataset: kohya reads them all."""
    path = write(work, """
[general]
caption_extension = "txt"
enable_bucket = true
resolution = 520
min_bucket_reso = 300
max_bucket_reso = 1000

[[datasets]]
  [[datasets.subsets]]
  image_dir = "img/a"
  [[datasets.subsets]]
  image_dir = "img/b"
  num_repeats = 0
  [[datasets.subsets]]
  image_dir = "img/a"
  num_repeats = 5

[[datasets]]
  [[datasets.subsets]]
  image_dir = "img/a"
""")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_dataset_config(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, AdjustedValueWarning)]
    d1, d2 = config.datasets
    assert [s.image_dir for s in d1.subsets] == [work / "img" / "a"]  # b skipped, the second img/a skipped
    assert d1.subsets[0].num_repeats == 1 and d1.subsets[0].caption_extension == ".txt"
    assert [s.image_dir for s in d2.subsets] == [work / "img" / "a"]  # another dataset: trained again, as kohya
    assert (d1.resolution, d1.min_bucket_reso, d1.max_bucket_reso) == ((512, 512), 256, 1024)
    for fragment in ["'caption_extension' (set in [general]) = 'txt' has no dot; using '.txt', as kohya does",
                     f"{S2}: num_repeats = 0: the subset ({work / 'img' / 'b'}) is skipped, as kohya does",
                     "[[datasets]] #1 > [[datasets.subsets]] #3: image_dir " + str(work / "img" / "a")
                     + " is already [[datasets]] #1 > [[datasets.subsets]] #1: this subset is skipped",
                     "'min_bucket_reso' (set in [general]) = 300 is not a multiple of bucket_reso_steps = 64; using 256 (rounded down",
                     "'max_bucket_reso' (set in [general]) = 1000 is not a multiple of bucket_reso_steps = 64; using 1024 (rounded up",
                     "'resolution' (set in [general]) = 520x520 is not a multiple of bucket_reso_steps = 64: the buckets are built for 512x512"]:
        assert any(fragment in m and str(path) in m for m in messages), fragment
    assert set(messages) <= set(config.notes)


def test_metadata_file_subsets_check_their_file_and_keys(work):
    (work / "meta.json").write_text('{"a1": {"caption": "x"}}')
    (work / "bad.json").write_text('{"a1": {"caption": 3}}')
    (work / "full.json").write_text(json.dumps({str(work / "img" / "a" / "a1"): {"tags": "t"}}))
    ok = load_quietly(write(work, '[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "full.json"\n'))
    (subset,) = ok.datasets[0].subsets
    assert subset.metadata_file == work / "full.json" and subset.image_dir is None  # full-path keys need no image_dir
    for subset_text, fragment in [
        ('metadata_file = "meta.json"', "missing key 'image_dir': the metadata_file's image keys are relative to it"),
        ('metadata_file = "bad.json"\nimage_dir = "img/a"', "entry 'a1': \"caption\" must be a string"),
        ('metadata_file = "meta.json"\nimage_dir = "img/a"\nclass_tokens = "x"', "'class_tokens' does not go with metadata_file"),
    ]:
        with pytest.raises(UserError) as e:
            load_quietly(write(work, f"[[datasets]]\n[[datasets.subsets]]\n{subset_text}\n"))
        assert "[[datasets]] #1 > [[datasets.subsets]] #1" in str(e.value) and fragment in str(e.value)
