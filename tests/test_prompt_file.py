"""library/sample/prompt_file.py: kohya's prompt-line syntax with the PFG options (no models needed)."""
from __future__ import annotations

import pytest

from library.errors import UserError
from library.sample.prompt_file import parse_prompt_line, read_prompt_file
from library.sample.sampler import Guide, SampleRequest

DEFAULTS = SampleRequest(prompt="default", width=512, height=512, steps=28, scale=7.0, seed=5, sampler="euler_a")


def test_every_option():
    line = ("illustration of *, (cat:1.2) --n lowres, bad anatomy --w 640 --h 768 --d 42 --s 20 --l 5.5"
            " --i a.png:0.8 --i b.png --ni c.png:0.5 --ps 0.7 --sampler dpm++2m_karras")
    request = parse_prompt_line(line, DEFAULTS)
    assert request == SampleRequest(
        prompt="illustration of *, (cat:1.2)", negative_prompt="lowres, bad anatomy", width=640, height=768,
        steps=20, scale=5.5, seed=42, sampler="dpm++2m_karras", pfg_scale=0.7,
        guides=(Guide("a.png", 0.8), Guide("b.png", 1.0)), negative_guides=(Guide("c.png", 0.5),),
    )


def test_defaults_fill_what_the_line_leaves_out():
    request = parse_prompt_line("just a prompt", DEFAULTS)
    assert request == SampleRequest(prompt="just a prompt", width=512, height=512, steps=28, scale=7.0, seed=5)


def test_kohya_spellings_upper_case_and_ss_sampler_names():
    request = parse_prompt_line("a cat --W 576 --H 640 --SS k_euler_a --D 7", DEFAULTS)
    assert (request.width, request.height, request.sampler, request.seed) == (576, 640, "euler_a", 7)
    assert parse_prompt_line("a cat --ss DPMSolver++", DEFAULTS).sampler == "dpm++2m"


def test_guide_weight_and_windows_drive_letters():
    assert Guide.parse("guide.png:0.25") == Guide("guide.png", 0.25)
    assert Guide.parse(r"C:\images\guide.png") == Guide(r"C:\images\guide.png", 1.0)
    assert Guide.parse(r"C:\images\guide.png:2") == Guide(r"C:\images\guide.png", 2.0)
    assert Guide.parse("odd:name.png") == Guide("odd:name.png", 1.0)  # not a number: part of the path


@pytest.mark.parametrize(
    "line,message",
    [
        ("a cat --w 500", "multiples of 8"),
        ("a cat --w wide", "option --w needs a number, got 'wide'"),
        ("a cat --q 3", "unknown option --q"),
        ("a cat --sampler nope", "unknown sampler 'nope'"),
        ("a cat --s 0", "steps must be at least 1"),
    ],
)
def test_mistakes_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# header\nfine prompt\n{line}\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        read_prompt_file(path, DEFAULTS)
    assert f"{path}:3:" in str(info.value) and message in str(info.value)


def test_file_skips_comments_and_resolves_guides_beside_it(tmp_path):
    (tmp_path / "guide.png").write_bytes(b"")
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\n  \nfirst --i guide.png:0.5 --ni guide.png\nsecond --i /abs/elsewhere.png\n", encoding="utf-8")
    first, second = read_prompt_file(path, DEFAULTS)
    assert first.guides == (Guide(str(tmp_path / "guide.png"), 0.5),)
    assert first.negative_guides == (Guide(str(tmp_path / "guide.png"), 1.0),)
    assert second.prompt == "second" and second.guides == (Guide("/abs/elsewhere.png", 1.0),)


def test_empty_or_missing_files_are_user_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="no prompts"):
        read_prompt_file(empty, DEFAULTS)
    with pytest.raises(UserError, match="prompt file not found"):
        read_prompt_file(tmp_path / "missing.txt", DEFAULTS)
