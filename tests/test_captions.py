"""Captions: file -> class_tokens -> --pfg_prompt, then shuffle with keep_tokens and dropout."""
from __future__ import annotations

import random

import numpy as np
import pytest

from library.data.captions import CaptionOptions, caption_path, process_caption, resolve_caption
from library.errors import UserError


def test_caption_file_wins(tmp_path):
    image = tmp_path / "a.b.png"
    (tmp_path / "a.b.txt").write_text("\n  1girl, red hair  \nsecond line\n", encoding="utf-8")
    assert caption_path(image, ".txt") == tmp_path / "a.b.txt"
    assert resolve_caption(image, ".txt", "sks girl", "illustration of *") == "1girl, red hair"


def test_caption_file_with_bom_and_empty_file(tmp_path):
    (tmp_path / "a.caption").write_bytes("\ufeffsolo".encode("utf-8"))
    (tmp_path / "b.caption").write_text("  \n", encoding="utf-8")
    assert resolve_caption(tmp_path / "a.png", ".caption", None, "p") == "solo"
    assert resolve_caption(tmp_path / "b.png", ".caption", "tokens", "p") == ""  # present: used, even empty


def test_fallbacks_class_tokens_then_pfg_prompt(tmp_path):
    image = tmp_path / "a.png"
    (tmp_path / "a.caption").write_text("wrong extension", encoding="utf-8")
    assert resolve_caption(image, ".txt", "sks girl", "illustration of *") == "sks girl"
    assert resolve_caption(image, ".txt", None, "illustration of *") == "illustration of *"
    assert resolve_caption(image, ".txt", "", "illustration of *") == "illustration of *"
    assert resolve_caption(image, ".txt", None, None) == ""


def test_undecodable_caption_names_the_file(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(UserError) as e:
        resolve_caption(tmp_path / "bad.png", ".txt", None, None)
    assert str(tmp_path / "bad.txt") in str(e.value) and "UTF-8" in str(e.value)


CAPTION = "sks girl, red hair, smile, outdoors, tree, sky"


def options(shuffle: bool = False, keep: int = 0, dropout: float = 0.0, **more) -> CaptionOptions:
    return CaptionOptions(shuffle_caption=shuffle, keep_tokens=keep, caption_dropout_rate=dropout, **more)


def test_no_shuffle_no_dropout_is_unchanged():
    rng = random.Random(0)
    assert process_caption(CAPTION, options(False, 2), rng) == CAPTION
    assert rng.random() == random.Random(0).random()  # nothing was drawn


@pytest.mark.parametrize("rng_factory", [random.Random, np.random.default_rng])
@pytest.mark.parametrize("keep", [0, 1, 2, 10])
def test_shuffle_keeps_the_first_keep_tokens(rng_factory, keep):
    tags = [t.strip() for t in CAPTION.split(",")]
    rng = rng_factory(1)
    outputs = {process_caption(CAPTION, options(True, keep), rng) for _ in range(50)}
    for out in outputs:
        got = out.split(", ")
        assert got[:keep] == tags[:keep]
        assert sorted(got) == sorted(tags)
    assert len(outputs) > 1 if keep < len(tags) - 1 else len(outputs) == 1
    again = rng_factory(1)
    first = process_caption(CAPTION, options(True, keep), rng_factory(1))
    assert process_caption(CAPTION, options(True, keep), again) == first  # deterministic per rng


def test_shuffle_drops_empty_tags():
    assert process_caption("a,, b ,", options(True, 3), random.Random(0)) == "a, b"


def test_dropout_returns_empty_caption_at_the_given_rate():
    assert process_caption(CAPTION, options(True, 1, 1.0), random.Random(0)) == ""
    rng = random.Random(3)
    dropped = sum(process_caption(CAPTION, options(dropout=0.25), rng) == "" for _ in range(4000))
    assert 850 < dropped < 1150
