"""gen_pfg.py through its entry point on the tiny models: conditioning, reproducibility,
equality with the plain diffusers pipeline, file formats, prompt files and user errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gen_pfg
from library.errors import UserError, run_cli
from library.sample.image_outputs import read_parameters
from library.models.pfg import PFGAdapter, PFGShape, pfg_metadata, save_pfg
from library.sample.sampler import (
    A1111_SAMPLER_NAMES, SAMPLERS, Guide, PFGSampler, SampleRequest, a1111_parameters, make_scheduler,
    parse_a1111_parameters,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers schedulers

REPO = Path(__file__).resolve().parent.parent
SIZE = ["--W", "64", "--H", "64", "--steps", "2"]
N_TOKENS = 4


def _adapter(input_dim: int, width: int, seed: int) -> PFGAdapter:
    """A random PFG head whose tokens are as large as text states, so guides visibly matter."""
    torch.manual_seed(seed)
    adapter = PFGAdapter(PFGShape(N_TOKENS, input_dim, width))
    torch.nn.init.normal_(adapter.pfg_linear.weight, std=3.0 / input_dim**0.5)
    return adapter


def _guide_image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # coarse blocks: a distinct picture per seed
    Image.fromarray(pixels).resize((96, 80), Image.Resampling.NEAREST).save(path)
    return path


@pytest.fixture(scope="session")
def kit(tmp_path_factory, tiny_sd1, tiny_sd2, tiny_tagger) -> dict[str, Path]:
    """Shared files: PFG heads in every format for both tiny models, guide images, a vector file."""
    from library.models.image_encoders import load_encoder
    from library.data.features import save_feature

    root = tmp_path_factory.mktemp("gen")
    encoder = load_encoder(str(tiny_tagger))
    files = {"sd1": tiny_sd1, "sd2": tiny_sd2, "tagger": tiny_tagger, "root": root}
    for name, (dim, width, seed) in {"pfg1": (768, 32, 0), "pfg2": (768, 64, 1), "pfg1_d1024": (1024, 32, 2)}.items():
        adapter = _adapter(dim, width, seed)
        files[name] = save_pfg(adapter, root / f"{name}-pfg.safetensors", pfg_metadata(adapter.shape, encoder.encoder_id))[0]
        if name == "pfg1":
            state = {k: v.clone() for k, v in adapter.state_dict().items()}
            files["pt_full"] = root / "orig-pfg.pt"
            torch.save(state, files["pt_full"])  # the original scripts' key names, no metadata
            files["pt_bare"] = root / "bare-pfg.pt"
            torch.save({"weight": state["pfg_linear.weight"], "bias": state["pfg_linear.bias"]}, files["pt_bare"])
    for i in range(3):
        files[f"g{i}"] = _guide_image(root / f"guide{i}.png", seed=i)
    files["init"] = _guide_image(root / "init.png", seed=9)
    files["npz"] = root / "guide0_pfg.npz"
    save_feature(files["npz"], encoder.encode([Image.open(files["g0"])])[0], encoder.encoder_id, files["g0"])
    files["npz_1024"] = root / "wide_pfg.npz"
    save_feature(files["npz_1024"], np.ones(1024, np.float32), "other", files["g0"])
    return files


def _run(tmp_path: Path, model: Path, *args: str, seed: int = 1) -> list[Path]:
    """Run gen_pfg.main into a fresh folder; the generated PNGs (not grids), in order."""
    outdir = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    argv = ["--pretrained_model_name_or_path", str(model), "--outdir", str(outdir), "--seed", str(seed), *SIZE, *map(str, args)]
    assert gen_pfg.main(argv) == 0
    return sorted(p for p in outdir.glob("*.png") if not p.name.startswith("grid"))


def _pfg_args(kit, model: str = "sd1") -> list:
    return ["--pfg_weights", kit["pfg1" if model == "sd1" else "pfg2"], "--tagger_model", kit["tagger"]]


def _pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _same(a, b) -> bool:
    return np.array_equal(_pixels(a), _pixels(b))


def _user_error(capsys, argv: list) -> str:
    """What a user sees on a UserError: exit status 2 and one `error:` line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: gen_pfg.main([str(a) for a in argv]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


# -- conditioning ---------------------------------------------------------------------------------


def test_guides_change_the_image_and_weights_one_to_zero_equal_the_first_alone(kit, tmp_path):
    pfg = _pfg_args(kit)
    (first,) = _run(tmp_path, kit["sd1"], *pfg, "--image", kit["g0"])
    (mixed,) = _run(tmp_path, kit["sd1"], *pfg, "--image", f"{kit['g0']}:1", "--image", f"{kit['g1']}:0")
    (other,) = _run(tmp_path, kit["sd1"], *pfg, "--image", kit["g1"])
    assert _same(first, mixed)
    assert not _same(first, other)


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_pfg_scale_zero_equals_the_plain_diffusers_pipeline(kit, tmp_path, model):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    (ours,) = _run(tmp_path, kit[model], *_pfg_args(kit, model), "--image", kit["g0"], "--pfg_scale", "0",
                   "--prompt", "a red cat, (sitting:1.0)", "--negative_prompt", "blurry", "--sampler", "euler_a", seed=3)
    pipe = StableDiffusionPipeline.from_pretrained(kit[model], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe("a red cat, sitting", negative_prompt="blurry", width=64, height=64, num_inference_steps=2,
                 guidance_scale=7.0, generator=torch.Generator().manual_seed(3)).images[0]
    assert _same(ours, plain)
    if model == "sd2":  # the v-prediction schedule came along from the model folder
        assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_img2img_with_pfg_scale_zero_equals_the_plain_img2img_pipeline(kit, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    (ours,) = _run(tmp_path, kit["sd1"], "--init_image", kit["init"], "--strength", "0.5", "--steps", "4",
                   "--sampler", "ddim", "--prompt", "a cat", seed=4)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(kit["sd1"], safety_checker=None, requires_safety_checker=False)
    # Real SD folders say clip_sample=false; the tiny PNDM config is silent, so say it here too.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    init = Image.open(kit["init"]).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    plain = pipe("a cat", image=init, strength=0.5, num_inference_steps=4, guidance_scale=7.0,
                 generator=torch.Generator().manual_seed(4)).images[0]
    assert _same(ours, plain)
    fields = parse_a1111_parameters(read_parameters(ours))
    assert fields["Denoising strength"] == "0.5" and fields["Init image"] == "init.png"


def test_same_seed_same_image_and_batch_member_equals_its_seed_alone(kit, tmp_path):
    pfg = [*_pfg_args(kit), "--image", kit["g0"]]
    (once,) = _run(tmp_path, kit["sd1"], *pfg, seed=12)
    (again,) = _run(tmp_path, kit["sd1"], *pfg, seed=12)
    batch = _run(tmp_path, kit["sd1"], *pfg, "--images_per_prompt", "3", "--batch_size", "3", seed=10)
    assert _same(once, again)
    assert [p.name.split("-")[1] for p in batch] == ["10.png", "11.png", "12.png"]  # each seed in the name
    # Batched matmuls may round differently in the last bit; the noise is the same, so at most 1/255 apart.
    assert np.abs(_pixels(batch[2]) - _pixels(once)).max() <= 1
    assert not _same(batch[0], batch[1])


def test_negative_image_and_uncond_eos_change_the_unconditional_branch(kit, tmp_path):
    pfg = [*_pfg_args(kit), "--image", kit["g0"]]
    (zeros,) = _run(tmp_path, kit["sd1"], *pfg)
    (eos,) = _run(tmp_path, kit["sd1"], *pfg, "--uncond", "eos")
    (negative,) = _run(tmp_path, kit["sd1"], *pfg, "--negative_image", kit["g1"])
    (negative_only,) = _run(tmp_path, kit["sd1"], *_pfg_args(kit), "--negative_image", kit["g1"])
    assert len({_pixels(p).tobytes() for p in (zeros, eos, negative, negative_only)}) == 4
    fields = parse_a1111_parameters(read_parameters(negative))
    assert fields["PFG negative images"] == "guide1.png:1" and fields["PFG uncond"] == "zeros"


def test_features_file_without_a_tagger_equals_the_guide_image(kit, tmp_path):
    (from_image,) = _run(tmp_path, kit["sd1"], *_pfg_args(kit), "--image", kit["g0"])
    (from_vector,) = _run(tmp_path, kit["sd1"], "--pfg_weights", kit["pfg1"], "--features", kit["npz"])
    assert _same(from_image, from_vector)


@pytest.fixture(scope="module")
def sd1_sampler(kit):
    from library.models.image_encoders import load_encoder
    from library.models.loading import load_sd_model
    from library.models.pfg import load_pfg

    model = load_sd_model(str(kit["sd1"]))
    adapter, _ = load_pfg(kit["pfg1"])
    return PFGSampler(model, adapter, load_encoder(str(kit["tagger"])))


@pytest.mark.parametrize("words,chunks", [(20, 1), (100, 2), (200, 3)])
def test_long_prompts_are_encoded_in_75_token_chunks(kit, sd1_sampler, words, chunks):
    request = SampleRequest(prompt=" ".join(["cat"] * words), guides=(Guide(str(kit["g0"])),))
    cond, uncond = sd1_sampler.embeddings(request)
    assert cond.shape == uncond.shape == (1, 77 * chunks + N_TOKENS, 32)
    # the short negative prompt was padded with empty chunks to the same length
    images = sd1_sampler.generate(SampleRequest(prompt=request.prompt, width=64, height=64, steps=1, guides=request.guides))
    assert images[0][0].size == (64, 64)


@pytest.mark.parametrize("img2img", [False, True])
def test_sampling_leaves_the_global_random_state_alone(kit, sd1_sampler, img2img):
    """Every sampler draws its noise only from the per-image seeded generators, so training samples
    (library/train/samples.py) cannot shift the training run's random stream."""
    import random

    init = str(kit["init"]) if img2img else ""
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    for name in SAMPLERS:
        sd1_sampler.generate(SampleRequest(prompt="a cat", width=64, height=64, steps=2, sampler=name, init_image=init,
                                           strength=1.0, guides=(Guide(str(kit["g0"])),)))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])


def test_uncond_padding_and_negative_tokens(kit, sd1_sampler):
    guides = (Guide(str(kit["g0"])),)
    cond, uncond = sd1_sampler.embeddings(SampleRequest(prompt="a cat", guides=guides, pfg_scale=0.5))
    tokens = sd1_sampler.pfg_tokens(guides, 0.5)
    assert torch.equal(cond[:, -N_TOKENS:], tokens) and not uncond[:, -N_TOKENS:].any()
    eos = PFGSampler(sd1_sampler.model, sd1_sampler.adapter, sd1_sampler.encoder, uncond="eos")
    _, uncond_eos = eos.embeddings(SampleRequest(prompt="a cat", guides=guides))
    assert torch.equal(uncond_eos[:, -N_TOKENS:], uncond_eos[:, 76:77].expand(1, N_TOKENS, 32))
    negative = (Guide(str(kit["g1"])),)
    _, uncond_neg = sd1_sampler.embeddings(SampleRequest(prompt="a cat", guides=guides, negative_guides=negative))
    assert torch.equal(uncond_neg[:, -N_TOKENS:], sd1_sampler.pfg_tokens(negative, 1.0))


# -- PFG files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["pt_full", "pt_bare"])
def test_original_pt_files_load_with_the_token_count_inferred(kit, tmp_path, variant):
    from library.models.pfg import load_pfg

    adapter, metadata = load_pfg(kit[variant], cross_attention_dim=32)
    assert adapter.shape == PFGShape(N_TOKENS, 768, 32) and metadata == {}
    guide = ["--tagger_model", kit["tagger"], "--image", kit["g0"]]
    (from_pt,) = _run(tmp_path, kit["sd1"], "--pfg_weights", kit[variant], *guide)
    (from_safetensors,) = _run(tmp_path, kit["sd1"], "--pfg_weights", kit["pfg1"], *guide)
    assert _same(from_pt, from_safetensors)


def test_encoder_width_mismatch_names_both_numbers(kit, capsys):
    base = ["--pretrained_model_name_or_path", kit["sd1"], *SIZE, "--outdir", kit["root"] / "never"]
    err = _user_error(capsys, [*base, "--pfg_weights", kit["pfg1_d1024"], "--tagger_model", kit["tagger"], "--image", kit["g0"]])
    assert "D=1024" in err and "D=768" in err
    err = _user_error(capsys, [*base, "--pfg_weights", kit["pfg1"], "--features", kit["npz_1024"]])
    assert "D=1024" in err and "D=768" in err and "wide_pfg.npz" in err


def test_cross_attention_width_mismatch_says_which_width_the_head_was_made_for(kit, tmp_path, capsys):
    """A head trained for another model family: from its metadata (ours), or from its shape (an
    original .pt without metadata whose rows are no whole number of this model's tokens)."""
    argv = ["--pretrained_model_name_or_path", kit["sd1"], *SIZE, "--outdir", kit["root"] / "never",
            "--pfg_weights", kit["pfg2"], "--tagger_model", kit["tagger"], "--image", kit["g0"]]
    err = _user_error(capsys, argv)
    assert "pfg2-pfg.safetensors: the PFG head was made for a model of cross-attention width C=64; this model's width is C=32" in err
    three_tokens = tmp_path / "three-pfg.pt"  # 3 tokens of SD1's tiny width 32: 96 rows, not a multiple of SD2's 64
    torch.save(PFGAdapter(PFGShape(3, 768, 32)).state_dict(), three_tokens)
    argv = ["--pretrained_model_name_or_path", kit["sd2"], *SIZE, "--outdir", kit["root"] / "never",
            "--pfg_weights", three_tokens, "--tagger_model", kit["tagger"], "--image", kit["g0"]]
    err = _user_error(capsys, argv)
    assert "three-pfg.pt: the PFG head was made for a model of another cross-attention width; this model's width is C=64" in err
    assert "96 output rows" in err and "--pfg_num_tokens" not in err


def test_pfg_weights_without_any_guide_are_refused(kit, tmp_path, capsys):
    """The head would load and never be used: an unguided image without a word. An unguided line
    on purpose says so with --ps 0 (or --pfg_scale 0)."""
    base = ["--pretrained_model_name_or_path", kit["sd1"], *SIZE, "--outdir", tmp_path / "never", *_pfg_args(kit)]
    err = _user_error(capsys, base)
    assert "command line: --pfg_weights is given but no guide: pass --image GUIDE.png or --features X_pfg.npz" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# a guided line, then an unguided one\na cat --i {kit['g0']} --d 1\na dog --d 2\n", encoding="utf-8")
    err = _user_error(capsys, [*base, "--from_file", prompts])
    assert f"{prompts}, prompt 2: --pfg_weights is given but no guide" in err and "--i GUIDE.png on the prompt line" in err
    assert not (tmp_path / "never").exists()
    prompts.write_text(f"a cat --i {kit['g0']} --d 1\na dog --d 2 --ps 0\n", encoding="utf-8")
    guided, unguided = _run(tmp_path, kit["sd1"], *_pfg_args(kit), "--from_file", prompts)
    assert "PFG images" in parse_a1111_parameters(read_parameters(guided))
    assert "PFG" not in parse_a1111_parameters(read_parameters(unguided))


def test_an_image_flag_every_prompt_line_overrides_is_reported(kit, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat --i {kit['g0']} --d 1\n", encoding="utf-8")
    (only,) = _run(tmp_path, kit["sd1"], *_pfg_args(kit), "--image", kit["g1"], "--from_file", prompts)
    assert f"note: every line of {prompts} has its own --i, so --image/--features are not used" in capsys.readouterr().out
    assert parse_a1111_parameters(read_parameters(only))["PFG images"] == "guide0.png:1"
    prompts.write_text(f"a cat --i {kit['g0']} --d 1\na dog --d 2\n", encoding="utf-8")  # the dog takes --image
    own, inherited = _run(tmp_path, kit["sd1"], *_pfg_args(kit), "--image", kit["g1"], "--from_file", prompts)
    assert "are not used" not in capsys.readouterr().out
    assert parse_a1111_parameters(read_parameters(inherited))["PFG images"] == "guide1.png:1"


def test_a_guide_weight_that_is_not_a_number_is_named(kit, capsys):
    argv = ["--pretrained_model_name_or_path", kit["sd1"], *SIZE, "--outdir", kit["root"] / "never", *_pfg_args(kit),
            "--image", f"{kit['g0']}:abc"]
    err = _user_error(capsys, argv)
    assert f"{kit['g0']}:abc: the weight 'abc' is not a number (PATH:WEIGHT, e.g. {kit['g0']}:0.5)" in err
    assert "guide not found" in _user_error(capsys, [*argv[:-1], f"{kit['root']}/missing.png:abc"])


# -- outputs ------------------------------------------------------------------------------------------


def test_png_parameters_round_trip(kit, tmp_path):
    prompt = "illustration of *, (masterpiece:1.2), a: b"
    (path,) = _run(tmp_path, kit["sd1"], *_pfg_args(kit), "--image", f"{kit['g0']}:0.7", "--image", f"{kit['g1']}:0.3",
                   "--prompt", prompt, "--negative_prompt", "lowres, bad", "--scale", "5.5", "--sampler", "dpm++2m_karras",
                   "--pfg_scale", "0.8", "--clip_skip", "2", seed=77)
    assert path.name.endswith("-77.png")
    fields = parse_a1111_parameters(read_parameters(path))
    assert fields["prompt"] == prompt and fields["negative_prompt"] == "lowres, bad"
    expected = {"Steps": "2", "Sampler": "DPM++ 2M Karras", "CFG scale": "5.5", "Seed": "77", "Size": "64x64",
                "Model": kit["sd1"].name, "Clip skip": "2", "PFG": "pfg1-pfg.safetensors",
                "PFG images": "guide0.png:0.7; guide1.png:0.3", "PFG scale": "0.8", "PFG uncond": "zeros"}
    assert {k: fields.get(k) for k in expected} == expected


def test_parameters_text_quotes_and_multiline_prompts():
    request = SampleRequest(prompt="line one\nline two", negative_prompt="bad\nworse", init_image="")
    text = a1111_parameters(request, 5, "my, model", "")
    fields = parse_a1111_parameters(text)
    assert fields["prompt"] == "line one\nline two" and fields["negative_prompt"] == "bad\nworse"
    assert fields["Model"] == "my, model" and fields["Seed"] == "5"


def test_grid_writes_a_labelled_contact_sheet(kit, tmp_path):
    from library.sample.image_outputs import LINE

    outputs = _run(tmp_path, kit["sd1"], *_pfg_args(kit), "--image", kit["g0"], "--images_per_prompt", "2", "--grid",
                   "--prompt", "a red cat", seed=5)
    (sheet,) = outputs[0].parent.glob("grid-*.png")
    assert len(outputs) == 2 and sheet.name == "grid-00001.png"  # named after the run's last image, 00001-6.png
    assert read_parameters(sheet).splitlines()[1:] == ["row 1: a red cat | guide0.png | seed 5, seed 6"]
    with Image.open(sheet) as im:
        assert im.size == (3 * 192, LINE + 192 + LINE)  # the prompt above; guide, then its two results; labels below
        cells = np.asarray(im.convert("RGB")).astype(int)
    title, images, labels = cells[:LINE], cells[LINE:LINE + 192], cells[LINE + 192:]
    assert images[:, :192].std() > 0 and images[:, 192:].std() > 0  # the guide and the results were drawn
    assert (title < 128).any() and (labels[:, :192] < 128).any()  # the prompt and the guide's name are written
    seed5, seed6 = labels[:, 192:384], labels[:, 384:]
    assert (seed5 < 128).any() and not np.array_equal(seed5, seed6)  # each result under its own seed


# -- prompt files and samplers --------------------------------------------------------------------------


def test_prompt_file_with_every_option_renders(kit, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# training samples\n"
        "\n"
        "a (cat:1.2) --n ugly, blurry --w 64 --h 72 --d 3 --s 2 --l 5.5 --i guide0.png:0.7 --i guide1.png:0.3"
        " --ni guide2.png --ps 0.8 --sampler ddim\n"
        f"a dog --ss k_euler --d 9 --i {kit['g0']}\n",
        encoding="utf-8",
    )
    (kit["root"] / "prompts.txt").write_text(prompts.read_text(), encoding="utf-8")  # guides relative to the file
    first, second = _run(tmp_path, kit["sd1"], *_pfg_args(kit), "--from_file", kit["root"] / "prompts.txt", "--W", "72")
    assert Image.open(first).size == (64, 72) and Image.open(second).size == (72, 64)
    fields = parse_a1111_parameters(read_parameters(first))
    assert fields["prompt"] == "a (cat:1.2)" and fields["negative_prompt"] == "ugly, blurry"
    expected = {"Seed": "3", "Steps": "2", "CFG scale": "5.5", "Sampler": "DDIM", "PFG scale": "0.8",
                "PFG images": "guide0.png:0.7; guide1.png:0.3", "PFG negative images": "guide2.png:1"}
    assert {k: fields[k] for k in expected} == expected
    second_fields = parse_a1111_parameters(read_parameters(second))
    assert second_fields["Sampler"] == "Euler" and second_fields["Seed"] == "9"


def test_size_left_open_comes_from_the_model_and_the_guide_shape(kit, tmp_path):
    """--W/--H 0: the tiny model's native 128 px area in the bucket of the 96x80 guide (6:5),
    recorded in the PNG; without a guide, the native square."""
    guided, = _run(tmp_path, kit["sd1"], *_pfg_args(kit), "--image", kit["g0"], "--W", "0", "--H", "0")
    assert Image.open(guided).size == (136, 120)
    assert parse_a1111_parameters(read_parameters(guided))["Size"] == "136x120"
    plain, = _run(tmp_path, kit["sd1"], "--W", "0", "--H", "0")
    assert Image.open(plain).size == (128, 128)


def _available(sampler: str) -> bool:
    try:
        make_scheduler(sampler, {})
    except UserError as e:  # an optional package (scipy for LMS) is missing: the message says which
        assert "scipy" in str(e) or "torchsde" in str(e)
        return False
    return True


def test_every_sampler_runs(kit, tmp_path, capsys):
    available = [name for name in SAMPLERS if _available(name)]
    assert available == list(SAMPLERS)  # requirements.txt brings what each needs (scipy for LMS)
    prompts = tmp_path / "samplers.txt"
    prompts.write_text("".join(f"a cat --sampler {name} --s 2 --d 1\n" for name in available), encoding="utf-8")
    outputs = _run(tmp_path, kit["sd1"], *_pfg_args(kit), "--image", kit["g0"], "--from_file", prompts)
    names = [parse_a1111_parameters(read_parameters(p))["Sampler"] for p in outputs]
    assert names == [A1111_SAMPLER_NAMES[name] for name in available]
    for path in outputs:
        assert _pixels(path).std() > 0


def test_a_sampler_whose_package_is_missing_is_refused_before_models_load(kit, tmp_path):
    """Where scipy is not installed, diffusers offers LMS as a placeholder that raises on use:
    gen_pfg.py names the sampler and the package, before any model loads (here scipy is hidden
    from a fresh interpreter, as if not installed)."""
    import subprocess
    import sys

    hide_scipy = ("import runpy, sys; sys.modules['scipy'] = None; sys.argv = ['gen_pfg.py', *sys.argv[1:]]; "
                  "runpy.run_path('gen_pfg.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_scipy, "--pretrained_model_name_or_path", str(tmp_path / "no-model"),
                             "--sampler", "lms", "--outdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: --sampler lms is unavailable here" in result.stderr and "scipy" in result.stderr
    assert "Traceback" not in result.stderr


def test_sd2_v_prediction_model_generates_with_pfg(kit, tmp_path):
    (path,) = _run(tmp_path, kit["sd2"], *_pfg_args(kit, "sd2"), "--image", kit["g0"], "--sampler", "dpm++2m")
    (plain,) = _run(tmp_path, kit["sd2"], *_pfg_args(kit, "sd2"), "--image", kit["g0"], "--sampler", "dpm++2m", "--pfg_scale", "0")
    assert Image.open(path).size == (64, 64) and not _same(path, plain)


# -- user errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--W", "100"], "--W 100 is not a positive multiple of 8"),
        (["--H", "60"], "--H 60 is not a positive multiple of 8"),
        (["--image", "x.png"], "--image needs --pfg_weights"),
        (["--image", "x.png", "--features", "x_pfg.npz"], "--image and --features need --pfg_weights"),
        (["--strength", "0.2", "--init_image", "x.png"], "steps x strength"),
        (["--sampler", "nope"], None),  # argparse lists the choices (exit 2 with usage)
    ],
)
def test_bad_options_fail_before_models_load(kit, tmp_path, capsys, args, message):
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), *SIZE, "--outdir", str(tmp_path), *args]
    if message is None:
        with pytest.raises(SystemExit) as exit_info:
            gen_pfg.main(argv)
        assert exit_info.value.code == 2 and "euler_a" in capsys.readouterr().err
        return
    assert message in _user_error(capsys, argv)


def test_prompt_file_mistakes_fail_before_the_first_image(kit, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat --d 1 --i {kit['g0']}\na dog --i missing.png\n", encoding="utf-8")
    argv = ["--pretrained_model_name_or_path", str(kit["sd1"]), *_pfg_args(kit), "--from_file", str(prompts),
            "--outdir", str(tmp_path / "out")]
    with pytest.raises(UserError, match="guide not found: missing.png"):
        gen_pfg.main([str(a) for a in argv])
    assert not (tmp_path / "out").exists()


def _pixels_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int64)


def test_vae_override_slicing_and_tiling_change_the_decode_as_expected(kit, tmp_path):
    """At 256 px the tiny VAE (sample size 128 px) really decodes in tiles: the image moves by the
    blending of tile seams, far less than another seed moves it. Slicing decodes a batch one image
    at a time: the same pixels (up to rounding). --vae loads the given VAE: the model's own VAE
    gives the same image, a changed one another image."""
    from diffusers import AutoencoderKL

    size = ["--W", "256", "--H", "256", "--steps", "2", "--prompt", "a cat"]
    two = ["--images_per_prompt", "2", "--batch_size", "2"]
    plain = [_pixels_of(p) for p in _run(tmp_path, kit["sd1"], *size, *two)]
    tiled = [_pixels_of(p) for p in _run(tmp_path, kit["sd1"], *size, *two, "--vae_tiling")]
    sliced = [_pixels_of(p) for p in _run(tmp_path, kit["sd1"], *size, *two, "--vae_slicing")]
    (other_seed,) = [_pixels_of(p) for p in _run(tmp_path, kit["sd1"], *size, seed=5)]
    seed_change = np.abs(plain[0] - other_seed).mean()
    for a, b in zip(plain, tiled):
        assert 0.5 < np.abs(a - b).mean() < 0.3 * seed_change
    for a, b in zip(plain, sliced):
        assert np.abs(a - b).max() <= 1

    vae = AutoencoderKL.from_pretrained(kit["sd1"] / "vae")
    with torch.no_grad():
        for parameter in vae.decoder.parameters():
            parameter.mul_(1.05)
    vae.save_pretrained(tmp_path / "changed-vae")
    (own,) = [_pixels_of(p) for p in _run(tmp_path, kit["sd1"], *size, "--vae", kit["sd1"] / "vae")]
    (changed,) = [_pixels_of(p) for p in _run(tmp_path, kit["sd1"], *size, "--vae", tmp_path / "changed-vae")]
    assert np.abs(own - plain[0]).max() <= 1  # the same VAE weights, read from the given folder
    assert np.abs(changed - plain[0]).mean() > 1.0


def _kohya_lora(unet_folder: Path, path: Path, seed: int) -> Path:
    """A kohya-layout LoRA (`lora_unet_<module path>.lora_down/.lora_up/.alpha`) for some attention layers."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in UNet2DConditionModel.from_pretrained(unet_folder).named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.3
            state[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(state, str(path))
    return path


def test_kohya_lora_file_applies_with_its_multiplier(kit, tmp_path):
    lora = _kohya_lora(kit["sd1"] / "unet", tmp_path / "a-lora.safetensors", seed=0)
    (plain,) = _run(tmp_path, kit["sd1"], "--prompt", "a cat")
    (full,) = _run(tmp_path, kit["sd1"], "--prompt", "a cat", "--network_weights", lora)
    (half,) = _run(tmp_path, kit["sd1"], "--prompt", "a cat", "--network_weights", lora, "--network_mul", "0.5")
    (muted,) = _run(tmp_path, kit["sd1"], "--prompt", "a cat", "--network_weights", lora, "--network_mul", "0")
    assert _same(plain, muted)
    assert len({_pixels(p).tobytes() for p in (plain, full, half)}) == 3


# -- hub ids ---------------------------------------------------------------------------------------------

HUB_ID = "someone/tiny-sd"
# Files a real SD repo also holds, which must never be requested: root single files, other
# variants and EMA copies, .bin and flax duplicates, components the loader does not use.
DECOYS = [
    "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin", "unet/diffusion_flax_model.msgpack",
    "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/pytorch_model.bin", "text_encoder/model.ema.safetensors",
    "safety_checker/config.json", "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
]


@pytest.fixture
def fake_hub(kit, tmp_path, monkeypatch):
    """The tiny SD1 folder served as a hub repo by stand-ins for huggingface_hub's functions. Its
    text encoder exists only as the fp16 variant file (as in repos that ship fp16 text encoders)."""
    import json
    import shutil
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    remote, cache = tmp_path / "remote", tmp_path / "hub-cache" / "snapshots" / "abc123"
    shutil.copytree(kit["sd1"], remote)
    (remote / "text_encoder" / "model.safetensors").rename(remote / "text_encoder" / "model.fp16.safetensors")
    index = json.loads((remote / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"], feature_extractor=["transformers", "CLIPImageProcessor"])
    (remote / "model_index.json").write_text(json.dumps(index))
    listing = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()) + DECOYS
    hub = SimpleNamespace(requested=[], remote=remote, reachable=True)

    def model_info(repo_id, **kwargs):
        if not hub.reachable:
            raise ConnectionError("network is unreachable")
        assert repo_id == HUB_ID
        return SimpleNamespace(sha="abc123", siblings=[SimpleNamespace(rfilename=n, size=1) for n in listing])

    def hf_hub_download(repo_id, filename, **kwargs):
        hub.requested.append(filename)
        assert filename not in DECOYS, f"requested {filename}"
        (cache / filename).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(remote / filename, cache / filename)
        return str(cache / filename)

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        assert local_files_only, "the cache lookup must never download"
        if repo_id != HUB_ID or not cache.is_dir():
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return hub


def test_hub_id_downloads_only_the_pipeline_files_and_the_cache_serves_it_offline(kit, tmp_path, fake_hub, monkeypatch, capsys):
    pfg = [*_pfg_args(kit), "--image", kit["g0"]]
    (local,) = _run(tmp_path, kit["sd1"], *pfg)
    (online,) = _run(tmp_path, HUB_ID, *pfg)
    expected = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
                "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
                "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert sorted(fake_hub.requested) == expected
    assert _same(online, local)  # the fp16-named text encoder file loaded as its variant
    assert parse_a1111_parameters(read_parameters(online))["Model"] == "tiny-sd"

    fake_hub.requested.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (offline,) = _run(tmp_path, HUB_ID, *pfg)
    assert fake_hub.requested == [] and _same(offline, local)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fake_hub.reachable = False
    (unreachable,) = _run(tmp_path, HUB_ID, *pfg)
    assert fake_hub.requested == [] and _same(unreachable, local)
    assert "using the cached copy" in capsys.readouterr().out

    argv = ["--pretrained_model_name_or_path", "someone/other-model", *SIZE, "--outdir", str(tmp_path / "x")]
    assert "hub cannot be reached (ConnectionError: network is unreachable)" in _user_error(capsys, argv)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _user_error(capsys, argv)
    assert "'someone/other-model' is neither a local path nor in the local Hugging Face cache" in line and "HF_HUB_OFFLINE=1" in line


def test_pipeline_file_selection_picks_one_weights_variant_per_component():
    from library.models.hub import select_pipeline_files

    index = {"_class_name": "StableDiffusionXLPipeline", **{p: ["x", "y"] for p in
             ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")}}
    names = ["unet/diffusion_pytorch_model.safetensors.index.json", "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model-00002-of-00002.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.ema.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
             "text_encoder/pytorch_model.bin", "text_encoder_2/model.bf16.safetensors", "text_encoder_2/model.fp16.safetensors",
             "tokenizer/vocab.json", "tokenizer_2/vocab.json", "scheduler/scheduler_config.json", "sd_xl_base_1.0.safetensors"]
    files, variants = select_pipeline_files("r", names, index)
    assert variants == {"unet": None, "vae": "fp16", "text_encoder": None, "text_encoder_2": "fp16"}
    assert [f for f in files if not f.endswith(".json")] == [
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors", "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/pytorch_model.bin", "text_encoder_2/model.fp16.safetensors"]
    with pytest.raises(UserError, match="r: model_index.json describes a FluxPipeline without unet, text_encoder, tokenizer"):
        select_pipeline_files("r", names, {"_class_name": "FluxPipeline", "vae": ["x", "y"], "scheduler": ["x", "y"]})
    with pytest.raises(UserError, match="r: unet/ holds no weights"):
        select_pipeline_files("r", [n for n in names if not n.startswith("unet/")], index)


# -- precision -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_dtypes_generate_on_cpu(kit, tmp_path, dtype):
    """--dtype bf16 and fp16 both run on the CPU (torch 2.x has half kernels there): the images
    have the requested size and stay near the fp32 image (same seed, rounding apart)."""
    pfg = [*_pfg_args(kit), "--image", kit["g0"], "--W", "64", "--H", "48"]
    (full,) = _run(tmp_path, kit["sd1"], *pfg, "--device", "cpu")
    (half,) = _run(tmp_path, kit["sd1"], *pfg, "--device", "cpu", "--dtype", dtype)
    assert Image.open(half).size == (64, 48)
    difference = np.abs(_pixels(half) - _pixels(full)).mean()
    assert 0 < difference < 8, difference


def test_an_overflowed_image_is_reported_not_silently_black(kit, capsys):
    """Half precision can overflow to NaN (SD2.x attention or SDXL's VAE in fp16): the image would
    come out black; the sampler says which seed and what to do."""
    from library.models.loading import load_sd_model

    model = load_sd_model(str(kit["sd1"]))
    torch.nn.init.constant_(model.unet.conv_out.bias, float("nan"))
    sampler = PFGSampler(model, None, dtype=torch.float16)
    ((image, seed),) = sampler.generate(SampleRequest(prompt="a cat", width=64, height=64, steps=1, seed=4))
    assert image.size == (64, 64) and seed == 4
    assert "warning: the image of seed 4 has NaN/inf pixels (the model overflowed in fp16); use --dtype bf16 or fp32" in capsys.readouterr().out
