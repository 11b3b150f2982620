"""`train_pfg.py --debug_dataset` and kohya's caption keys, one test per key, through the entry point:
every line shows the caption exactly as the text encoder gets it. No model is loaded (the model
path does not even exist)."""
from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train_pfg
from library.data.captions import CaptionOptions, process_caption
from library.data.dataset import collect_items, draw_sample
from library.data.dataset_config import load_dataset_config
from library.train.plan import EpochPlan

LINE = re.compile(r"^epoch 1, step (\d+): (\S+) \[(\d+)x(\d+)([^\]]*)\] (\".*\")$")
TAGS = "a, b, c, d, e, f"


@pytest.fixture
def images(tmp_path) -> Path:
    """Four small images with the caption TAGS (kohya's .txt caption files)."""
    folder = tmp_path / "img"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text(TAGS, encoding="utf-8")
    return folder


def debug(tmp_path: Path, images: Path, subset: str = "", general: str = "", *flags: str, capsys) -> list[tuple]:
    """(step, image name, bucket, rest, caption) per printed sample line."""
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\nresolution = 64\nbatch_size = 1\ncaption_extension = ".txt"\nnum_repeats = 2\n{general}\n'
                    f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n{subset}\n')
    assert train_pfg.main(["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--dataset_config", str(toml),
                           "--debug_dataset", *flags]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("samples in epoch 1 (--debug_dataset: nothing was trained)")
    lines = [LINE.match(line) for line in out if line.startswith("epoch 1, step")]
    assert lines and all(lines)
    return [(int(m[1]), Path(m[2]).name, f"{m[3]}x{m[4]}", m[5], json.loads(m[6])) for m in lines]


def captions(rows) -> list[str]:
    return [row[-1] for row in rows]


def test_plain_dataset_lists_every_sample_of_the_first_epoch(tmp_path, images, capsys):
    rows = debug(tmp_path, images, capsys=capsys)
    assert len(rows) == 8 and sorted({r[1] for r in rows}) == ["im0.png", "im1.png", "im2.png", "im3.png"]
    assert [r[0] for r in rows] == list(range(1, 9)) and {r[2] for r in rows} == {"64x64"}
    assert set(captions(rows)) == {TAGS}  # no caption key: exactly the file


def test_caption_prefix_and_suffix(tmp_path, images, capsys):
    rows = debug(tmp_path, images, 'caption_prefix = "masterpiece,"\ncaption_suffix = ", best quality"', capsys=capsys)
    assert set(captions(rows)) == {f"masterpiece, {TAGS} , best quality"}  # kohya joins with a space


def test_shuffle_caption_and_keep_tokens(tmp_path, images, capsys):
    rows = debug(tmp_path, images, "shuffle_caption = true\nkeep_tokens = 2", capsys=capsys)
    tags = [c.split(", ") for c in captions(rows)]
    assert all(t[:2] == ["a", "b"] and sorted(t) == TAGS.split(", ") for t in tags) and len({tuple(t) for t in tags}) > 1
    assert debug(tmp_path, images, "shuffle_caption = true\nkeep_tokens = 2", capsys=capsys) == rows  # seed-stable


def test_keep_tokens_separator_keeps_both_ends(tmp_path, images, capsys):
    for caption in images.glob("*.txt"):
        caption.write_text("sks, girl ||| a, b, c, d ||| masterpiece")
    rows = debug(tmp_path, images, 'shuffle_caption = true\nkeep_tokens_separator = "|||"', capsys=capsys)
    for tags in (c.split(", ") for c in captions(rows)):
        assert tags[:2] == ["sks", "girl"] and tags[-1] == "masterpiece" and sorted(tags[2:-1]) == ["a", "b", "c", "d"]
    assert len(set(captions(rows))) > 1


def test_caption_separator(tmp_path, images, capsys):
    for caption in images.glob("*.txt"):
        caption.write_text("red hair; blue eyes, smiling; outdoors")
    rows = debug(tmp_path, images, 'shuffle_caption = true\ncaption_separator = ";"', capsys=capsys)
    # split at ";" (the comma stays inside its tag), shuffled, joined with ", " as kohya joins them
    tags = ["red hair", "blue eyes, smiling", "outdoors"]
    assert set(captions(rows)) <= {", ".join(order) for order in itertools.permutations(tags)}
    assert len(set(captions(rows))) > 1


def test_secondary_separator_joins_words_into_one_tag(tmp_path, images, capsys):
    for caption in images.glob("*.txt"):
        caption.write_text("sky;;;clouds, sea, sun")
    rows = debug(tmp_path, images, 'shuffle_caption = true\nsecondary_separator = ";;;"', capsys=capsys)
    for caption in captions(rows):  # "sky;;;clouds" moves as one tag, then becomes "sky,clouds"
        assert "sky,clouds" in caption.split(", ") and sorted(caption.split(", ")) == sorted(["sky,clouds", "sea", "sun"])


def test_enable_wildcard_picks_options_and_lines_seed_stably(tmp_path, images, capsys):
    for caption in images.glob("*.txt"):
        caption.write_text("a {red|blue|green} cat, {{literal}}\n\na dog\n", encoding="utf-8")
    rows = debug(tmp_path, images, "enable_wildcard = true", capsys=capsys)
    assert set(captions(rows)) <= {"a red cat, {literal}", "a blue cat, {literal}", "a green cat, {literal}", "a dog"}
    assert len(set(captions(rows))) >= 3
    assert debug(tmp_path, images, "enable_wildcard = true", capsys=capsys) == rows  # same seed: same picks
    other = debug(tmp_path, images, "enable_wildcard = true", "", "--seed", "5", capsys=capsys)
    assert captions(other) != captions(rows)
    plain = debug(tmp_path, images, "", capsys=capsys)  # without the key: the first line, braces as they are
    assert set(captions(plain)) == {"a {red|blue|green} cat, {{literal}}"}


def test_caption_tag_dropout_rate_seed_stable(tmp_path, images, capsys):
    rows = debug(tmp_path, images, "caption_tag_dropout_rate = 0.5\nkeep_tokens = 1", capsys=capsys)
    tags = [c.split(", ") if c else [] for c in captions(rows)]
    assert all(t[:1] == ["a"] and set(t) <= set(TAGS.split(", ")) for t in tags)  # the kept tag never drops
    assert any(len(t) < 6 for t in tags) and debug(tmp_path, images, "caption_tag_dropout_rate = 0.5\nkeep_tokens = 1", capsys=capsys) == rows


def test_caption_dropout_rate(tmp_path, images, capsys):
    assert set(captions(debug(tmp_path, images, "caption_dropout_rate = 1.0", capsys=capsys))) == {""}
    rows = debug(tmp_path, images, "caption_dropout_rate = 0.5", capsys=capsys)
    assert set(captions(rows)) == {"", TAGS} and debug(tmp_path, images, "caption_dropout_rate = 0.5", capsys=capsys) == rows


def test_caption_dropout_every_n_epochs(tmp_path, images, capsys):
    """kohya counts epochs from 1: every 1st epoch drops all captions, every 2nd not the first."""
    assert set(captions(debug(tmp_path, images, "caption_dropout_every_n_epochs = 1", capsys=capsys))) == {""}
    assert set(captions(debug(tmp_path, images, "caption_dropout_every_n_epochs = 2", capsys=capsys))) == {TAGS}
    # the second epoch (index 1) of the same plan drops them: the epoch travels in the sample key
    items, _ = collect_items(load_dataset_config(tmp_path / "d.toml"), "")
    plan = EpochPlan(items, [1], 42, 1, 0, 1, 100, 0)
    second = [draw_sample(items[k.index], k, 100).caption for batch in plan.batches_for_epoch(1) for k in batch]
    assert set(second) == {""} and plan.batches_for_epoch(1)[0][0].step == 8  # steps go on across epochs


def test_token_warmup_grows_the_tag_count_by_step(tmp_path, images, capsys):
    rows = debug(tmp_path, images, "token_warmup_min = 2\ntoken_warmup_step = 6", capsys=capsys)
    for step, *_, caption in rows:  # kohya: floor(step * (tags - min) / warmup) + min tags, then all of them
        done = step - 1  # optimizer steps before this sample
        count = 6 if done >= 6 else done * (6 - 2) // 6 + 2
        assert caption == ", ".join(TAGS.split(", ")[:count]), (step, caption)
    # below 1: a fraction of the run's steps (here 0.5 of --max_train_steps 8 = 4 steps)
    fraction = debug(tmp_path, images, "token_warmup_step = 0.5", "", "--max_train_steps", "8", capsys=capsys)
    assert [len(c.split(", ")) for c in captions(fraction)] == [1, 2, 3, 4, 6, 6, 6, 6]


def test_command_line_dataset_flags_without_a_toml(tmp_path, images, capsys):
    assert train_pfg.main(["--pretrained_model_name_or_path", "none", "--train_data_dir", str(images), "--resolution", "64",
                           "--caption_extension", ".txt", "--caption_prefix", "sks", "--shuffle_caption", "--keep_tokens", "1",
                           "--flip_aug", "--debug_dataset"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1")]
    assert len(lines) == 4 and all('"sks a, ' in line for line in lines) and any(", flipped]" in line for line in lines)


def test_metadata_file_captions_and_tags_are_used(tmp_path, images, capsys):
    """kohya's fine-tuning subset: keys are image stems (merge_captions_to_metadata.py's default)
    or full paths; the caption and the tags join with the caption separator."""
    metadata = {"im0": {"caption": "a photo", "tags": "x, y"}, "im1": {"tags": "only tags"},
                str(images / "im2.png"): {"caption": "full path"}, "missing": {"caption": "gone"}}
    (tmp_path / "meta.json").write_text(json.dumps(metadata), encoding="utf-8")
    toml = tmp_path / "ft.toml"
    toml.write_text(f'[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n'
                    f'metadata_file = "{(tmp_path / "meta.json").as_posix()}"\n')
    assert train_pfg.main(["--pretrained_model_name_or_path", "none", "--dataset_config", str(toml), "--debug_dataset"]) == 0
    out = capsys.readouterr().out
    found = {Path(m[2]).name: json.loads(m[6]) for m in map(LINE.match, out.splitlines()) if m}
    assert found == {"im0.png": "a photo,x, y", "im1.png": "only tags", "im2.png": "full path"}  # im3: not listed
    assert "missing: listed in metadata_file" in out  # an entry without its image is reported, not trained


def test_validation_split_in_the_toml_holds_images_out(tmp_path, images, capsys):
    rows = debug(tmp_path, images, "", "validation_split = 0.25\nvalidation_seed = 3", capsys=capsys)
    assert len({r[1] for r in rows}) == 3  # one of the four images is held out
    same = debug(tmp_path, images, "", "validation_split = 0.25\nvalidation_seed = 3", "--seed", "9", capsys=capsys)
    assert {r[1] for r in same} == {r[1] for r in rows}  # validation_seed, not --seed, picks them


def test_caption_keys_without_randomness_draw_nothing():
    """The stream of a run without random caption keys is the one it always had (the demo's numbers hold)."""
    rng, untouched = random.Random(1), random.Random(1)
    options = CaptionOptions(caption_prefix="p", caption_suffix="s", keep_tokens_separator="|", secondary_separator=";",
                             caption_dropout_every_n_epochs=3)
    assert process_caption("x;y", options, rng, epoch=1) == "p x,y s"
    assert rng.random() == untouched.random()
