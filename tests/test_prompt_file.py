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


KOHYA_TOML = """
[prompt]
negative_prompt = "lowres, bad anatomy"
width = 512
height = 512
scale = 7.5
sample_steps = 28

[[prompt.subset]]
prompt = "1girl, white shirt, upper body"
seed = 1

[[prompt.subset]]
prompt = "1boy, business suit"
width = 576
height = 832
sample_steps = 40
seed = 2
sample_sampler = "k_euler_a"
guides = "guide.png:0.5"
pfg_scale = 0.8
"""


def test_kohya_toml_form_one_request_per_subset_with_its_defaults(tmp_path):
    (tmp_path / "guide.png").write_bytes(b"")
    path = tmp_path / "prompts.toml"
    path.write_text(KOHYA_TOML, encoding="utf-8")
    first, second = read_prompt_file(path, DEFAULTS)
    assert first == SampleRequest(prompt="1girl, white shirt, upper body", negative_prompt="lowres, bad anatomy",
                                  width=512, height=512, steps=28, scale=7.5, seed=1)
    assert (second.prompt, second.width, second.height, second.steps, second.seed, second.sampler) == (
        "1boy, business suit", 576, 832, 40, 2, "euler_a")
    assert second.negative_prompt == "lowres, bad anatomy" and second.pfg_scale == 0.8
    assert second.guides == (Guide(str(tmp_path / "guide.png"), 0.5),)


def test_kohya_json_form_tables_and_lines(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('[{"prompt": "a cat", "width": 640, "height": 384, "seed": 3, "sample_steps": 12, "scale": 5},'
                    ' "a dog --w 320 --h 448 --d 4 --s 9", {"prompt": "a bird", "guides": ["a.png", "b.png:2"]}]')
    cat, dog, bird = read_prompt_file(path, DEFAULTS)
    assert (cat.prompt, cat.width, cat.height, cat.seed, cat.steps, cat.scale) == ("a cat", 640, 384, 3, 12, 5.0)
    assert (dog.prompt, dog.width, dog.height, dog.seed, dog.steps) == ("a dog", 320, 448, 4, 9)
    assert bird.guides == (Guide("a.png", 1.0), Guide("b.png", 2.0)) and bird.width == 512  # the defaults fill the rest


@pytest.mark.parametrize("name, text, message", [
    ("p.toml", "[[prompt.subset]]\nprompt = 'x'\n[other]\na = 1\n", "found other"),
    ("p.toml", "[prompt]\nwidth = 512\n[[prompt.subset]]\nprompt = 'x'\nwidht = 64\n",
     "p.toml: [[prompt.subset]] #1: unknown key 'widht' (did you mean 'width'?)"),
    ("p.toml", "[prompt]\nscale = 'high'\n[[prompt.subset]]\nprompt = 'x'\n", "p.toml: [prompt]: 'scale' must be a number"),
    ("p.json", '{"prompt": "x"}', "a JSON prompt file is a list of prompts"),
    ("p.json", '["ok", 3]', "p.json: entry #2: a prompt must be a table of kohya's keys or a prompt line, got 3"),
    ("p.json", '[{"prompt": "x", "sample_steps": "many"}]', "p.json: entry #1: 'sample_steps' must be an integer"),
    ("p.json", '[{"prompt": "x", "width": 500}]', "p.json: entry #1: width and height must be positive multiples of 8"),
    ("p.json", '[{"prompt": "x", "guidance_scale": 3.5}]', "p.json: entry #1: guidance_scale is the embedded guidance of FLUX"),
    ("p.json", '[{"prompt": "x", ', "p.json:1: JSON syntax error"),
])
def test_wrong_forms_and_keys_name_the_file_and_the_entry(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        read_prompt_file(path, DEFAULTS)
    assert message in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.parametrize("option, reason", [
    ("--g 3.5", "embedded guidance scale of FLUX-style models"), ("--ctr 0.25", "Lumina sampler"),
    ("--rcfg 1.0", "renormalised CFG"), ("--fs 3", "flow-matching models"), ("--cn control.png", "through --i"),
])
def test_kohya_options_of_other_model_families_stay_errors_with_the_reason(option, reason):
    with pytest.raises(UserError, match=reason):
        parse_prompt_line(f"a cat {option} --w 512", DEFAULTS, "p.txt:1: ")


def test_steps_above_1000_are_clamped_with_a_warning_as_kohya_does(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat --s 5000\n")
    with pytest.warns(UserWarning, match=r"p\.txt:1: 5000 steps are clamped to 1000, as kohya does"):
        (request,) = read_prompt_file(path, DEFAULTS)
    assert request.steps == 1000
    json_path = tmp_path / "p.json"
    json_path.write_text('[{"prompt": "x", "sample_steps": 1001}]')
    with pytest.warns(UserWarning, match=r"entry #1: 1001 steps are clamped"):
        assert read_prompt_file(json_path, DEFAULTS)[0].steps == 1000
