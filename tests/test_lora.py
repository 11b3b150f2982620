"""LoRA: `train_pfg.py --train_unet lora` writes kohya-layout files that diffusers loads to the
same UNet output; kohya files made elsewhere (hand-built here with kohya's exact names) apply
through `apply_lora_files` (gen_pfg.py's path) as the closed form W + mul * alpha/rank * up @ down."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train_pfg
from library.models import lora as lora_module
from library.cli_config import parse_settings
from library.errors import UserError
from library.models.ldm_keys import unet_key_map
from library.models.lora import LoraShape, add_unet_lora, lora_state_dict
from library.metadata import safetensors_hashes
from library.models.loading import SDModel, load_sd_model
from library.models.lora import apply_lora_files
from library.train.settings import TrainSettings
from library.train.setup import parameter_groups, prepare_sd_model

KEY = re.compile(r"^lora_unet_([a-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# What kohya's LoRA puts on each Transformer2DModel of SD1/SD2 (12 layers each; 192 on SD1.5).
TRANSFORMER_LAYERS = {
    "proj_in", "proj_out",
    *(f"transformer_blocks_0_attn{a}_{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")),
    "transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2",
}


def _a1111_name(layer: str) -> str:
    """A1111's Lora extension's kohya-name -> LDM-module-name conversion for SD1/SD2 UNets
    (its convert_diffusers_name_to_compvis), re-expressed: a key it cannot map is "not loaded"."""
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", layer):
        suffix = m[4] if m[2] == "attentions" else resnet.get(m[4], m[4])
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", layer):
        suffix = m[3] if m[1] == "attentions" else resnet.get(m[3], m[3])
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", layer):
        suffix = m[4] if m[2] == "attentions" else resnet.get(m[4], m[4])
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", layer):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", layer):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    return layer


def _unet_input(model: SDModel, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 77 + 2, model.cross_attention_dim, generator=g)
    return sample, torch.tensor([500]), context


@torch.no_grad()
def _unet_out(unet: torch.nn.Module, inputs) -> torch.Tensor:
    sample, t, context = inputs
    return unet(sample, t, encoder_hidden_states=context).sample


@torch.no_grad()
def _text_out(model: SDModel) -> torch.Tensor:
    ids = model.tokenizer(["illustration of a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return model.text_encoder(ids).last_hidden_state


def _diffusers_load(model: SDModel, files: list[Path], weights: list[float]) -> None:
    """diffusers' own path, without ours: StableDiffusionPipeline.load_lora_weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    names = [f"f{i}" for i in range(len(files))]
    for name, file in zip(names, files):
        pipe.load_lora_weights(str(file), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=weights)


# -- training through the entry point ------------------------------------------------------


def _train(model_dir: Path, dataset_toml: Path, out: Path, *extra: str) -> None:
    argv = [
        "--pretrained_model_name_or_path", str(model_dir), "--dataset_config", str(dataset_toml),
        "--output_dir", str(out), "--output_name", "run", "--train_unet", "lora",
        "--network_dim", "4", "--network_alpha", "2", "--optimizer_type", "AdamW",
        "--learning_rate", "1e-2", "--pfg_num_tokens", "2", "--max_train_steps", "2", "--seed", "0", *extra,
    ]
    assert train_pfg.main(argv) == 0


@pytest.mark.parametrize("variant,conv_dim", [("sd1", 0), ("sd2", 2)])
def test_train_lora_writes_kohya_file_that_diffusers_reproduces(variant, conv_dim, request, prepared_dataset, tmp_path, monkeypatch):
    model_dir = request.getfixturevalue(f"tiny_{variant}")
    base = load_sd_model(str(model_dir))
    inputs = _unet_input(base)
    base_out = _unet_out(base.unet, inputs)
    base_weights = {k: v.clone() for k, v in base.unet.state_dict().items()}

    # Record the trainer's own LoRA UNet output at the moment it saves the file.
    in_process = {}
    real_save = lora_module.save_lora

    def recording_save(path, unet, dtype, metadata):
        in_process["out"] = _unet_out(unet, inputs)
        in_process["base"] = {k.replace(".base_layer", ""): v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
        return real_save(path, unet, dtype, metadata)

    monkeypatch.setattr(lora_module, "save_lora", recording_save)
    extra = ("--network_conv_dim", str(conv_dim), "--network_conv_alpha", "1", "--gradient_checkpointing") if conv_dim else ()
    _train(model_dir, prepared_dataset, tmp_path, *extra)

    lora_file, pfg_file = tmp_path / "run-lora.safetensors", tmp_path / "run-pfg.safetensors"
    assert lora_file.is_file() and pfg_file.is_file()
    assert not list(tmp_path.glob("run.safetensors"))  # no full UNet in lora mode
    # The trainer changed only the LoRA: its frozen base weights are the model's.
    assert in_process["base"].keys() == base_weights.keys()
    for key, value in base_weights.items():
        assert torch.equal(in_process["base"][key], value), key

    # Keys: kohya's pattern, three per layer, every layer a real UNet Linear/Conv2d.
    tensors = load_file(str(lora_file))
    modules = {path.replace(".", "_"): m for path, m in base.unet.named_modules()}
    layers: dict[str, set[str]] = {}
    for key in tensors:
        match = KEY.match(key)
        assert match, key
        layers.setdefault(match.group(1), set()).add(match.group(2))
    # A1111 maps each name to an LDM module (ComfyUI maps diffusers paths, checked just above it).
    ldm_modules = {f"diffusion_model_{v[: -len('.weight')].replace('.', '_')}" for v in unet_key_map(base_weights).values() if v.endswith(".weight")}
    for name, parts in layers.items():
        assert parts == {"lora_down.weight", "lora_up.weight", "alpha"}, name
        assert isinstance(modules.get(name), (torch.nn.Linear, torch.nn.Conv2d)), name
        assert _a1111_name(f"lora_unet_{name}") in ldm_modules, name
    attention = {n for n in layers if "_attentions_" in n}
    assert len(attention) == 16 * len(TRANSFORMER_LAYERS)  # 16 Transformer2DModels, as in SD1.5
    assert {n.split("_attentions_")[1][2:] for n in attention} == TRANSFORMER_LAYERS
    q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"lora_unet_{q}.lora_down.weight"].shape == (4, modules[q].in_features)
    assert tensors[f"lora_unet_{q}.alpha"].item() == 2.0
    assert tensors[f"lora_unet_{q}.lora_up.weight"].abs().max() > 0  # it trained
    conv_layers = set(layers) - attention
    if conv_dim:
        for name in ("down_blocks_0_resnets_0_conv1", "mid_block_resnets_1_conv2", "down_blocks_1_downsamplers_0_conv",
                     "up_blocks_2_upsamplers_0_conv", "up_blocks_0_resnets_2_conv_shortcut", "down_blocks_3_resnets_0_time_emb_proj"):
            assert name in conv_layers, name
        conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
        assert tensors[f"{conv1}.lora_down.weight"].shape == (2, 32, 3, 3)
        assert tensors[f"{conv1}.lora_up.weight"].shape == (32, 2, 1, 1)
        assert tensors[f"{conv1}.alpha"].item() == 1.0
        assert all(("resnets" in n or "samplers" in n) for n in conv_layers)
    else:
        assert not conv_layers

    # Metadata: kohya's network keys, modelspec and the hashes webui extensions read.
    with safe_open(str(lora_file), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert ("ss_network_args" in meta) == bool(conv_dim)
    assert meta["modelspec.architecture"].endswith("/lora")
    assert meta["ss_base_model_version"] == variant
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == safetensors_hashes(tensors, meta)

    # diffusers on a fresh copy of the base model reproduces the trainer's UNet.
    fresh = load_sd_model(str(model_dir))
    _diffusers_load(fresh, [lora_file], [1.0])
    loaded_out = _unet_out(fresh.unet, inputs)
    torch.testing.assert_close(loaded_out, in_process["out"], atol=1e-5, rtol=1e-5)
    assert (loaded_out - base_out).abs().max() > 1e-4


def test_lora_setup_freezes_the_unet_and_trains_fp32_lora(tiny_sd1):
    settings, _ = parse_settings(TrainSettings, [
        "--pretrained_model_name_or_path", str(tiny_sd1), "--train_data_dir", "unused", "--train_unet", "lora",
        "--network_dim", "4", "--network_conv_dim", "2", "--mixed_precision", "bf16",
    ], "")
    settings.validate()
    model = load_sd_model(str(tiny_sd1))
    prepare_sd_model(model, settings, torch.device("cpu"))
    from library.models.pfg import PFGAdapter, PFGShape

    groups = parameter_groups(settings, PFGAdapter(PFGShape(2, 8, 32, 0)), model.unet)
    trained = {id(p) for p in groups[1]["params"]}
    named = dict(model.unet.named_parameters())
    assert trained == {id(p) for n, p in named.items() if ".lora_" in n} and trained
    assert all(p.dtype == torch.float32 for p in groups[1]["params"])  # LoRA fp32 under bf16 autocast
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for n, p in named.items() if ".lora_" not in n)
    assert groups[1]["lr"] == settings.learning_rate

    before = {n: p.detach().clone() for n, p in named.items()}
    optimizer = torch.optim.AdamW(groups[1]["params"], lr=1e-2)
    sample, t, context = _unet_input(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.unet(sample, t, encoder_hidden_states=context).sample.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    for n, p in named.items():
        if ".lora_" not in n:
            assert torch.equal(p, before[n]), n
    assert all(not torch.equal(p, before[n]) for n, p in named.items() if ".lora_B." in n)


def test_network_weights_continues_a_lora_file(tiny_sd1, tmp_path, capsys):
    model = load_sd_model(str(tiny_sd1))
    add_unet_lora(model.unet, LoraShape(4, 2.0, 2, 1.0), torch.float32)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.1)
    path = lora_module.save_lora(tmp_path / "a-lora.safetensors", model.unet, torch.float32, {})
    saved = load_file(str(path))

    again = load_sd_model(str(tiny_sd1))
    add_unet_lora(again.unet, LoraShape(8, 8.0), torch.float32, str(path))  # the file's ranks win
    assert "continuing with the file's (rank, alpha) [(2, 1.0), (4, 2.0)]" in capsys.readouterr().out
    restored = lora_state_dict(again.unet)
    assert restored.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key


def test_network_weights_needs_lora_mode(tiny_sd1):
    settings, _ = parse_settings(TrainSettings, [
        "--pretrained_model_name_or_path", str(tiny_sd1), "--train_data_dir", "x", "--train_unet", "full",
        "--network_weights", "a.safetensors",
    ], "")
    with pytest.raises(UserError, match="--network_weights needs --train_unet lora"):
        settings.validate()


# -- kohya files made elsewhere ------------------------------------------------------------

# kohya's names, written out by hand: attention (self and cross), feed-forward, SD1's 1x1
# proj_in conv, 3x3 convs of a ResNet, a downsampler and an upsampler, a time embedding, and
# a text encoder layer. (rank, alpha) differ per layer and alpha != rank.
FIXTURE_LAYERS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (4, 1.0),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": (4, 3.0),
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0": (2, 8.0),
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj": (4, 2.0),
    "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_ff_net_2": (3, 1.5),
    "lora_unet_down_blocks_1_attentions_1_proj_in": (4, 2.0),
    "lora_unet_down_blocks_0_resnets_1_conv1": (2, 1.0),
    "lora_unet_mid_block_resnets_0_time_emb_proj": (4, 2.0),
    "lora_unet_down_blocks_1_downsamplers_0_conv": (3, 1.0),
    "lora_unet_up_blocks_2_upsamplers_0_conv": (2, 4.0),
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": (4, 2.0),
    "lora_te_text_model_encoder_layers_3_mlp_fc2": (2, 1.0),
}


def _module(model: SDModel, kohya_key: str) -> torch.nn.Module:
    """Resolve a kohya name by walking the modules (underscores are ambiguous in names)."""
    if kohya_key.startswith("lora_unet_"):
        root, name, paths = model.unet, kohya_key[len("lora_unet_"):], dict(model.unet.named_modules())
    else:  # kohya names CLIP layers as transformers 4 did: text_model.encoder.layers...
        root, name = model.text_encoder, kohya_key[len("lora_te_"):]
        paths = {p if p.startswith("text_model.") else f"text_model.{p}": m for p, m in root.named_modules()}
    found = [m for path, m in paths.items() if path.replace(".", "_") == name]
    assert len(found) == 1, kohya_key
    return found[0]


def _write_fixture(model: SDModel, path: Path, layers: dict[str, tuple[int, float]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (rank, alpha) in layers.items():
        module = _module(model, name)
        if isinstance(module, torch.nn.Linear):
            down, up = (rank, module.in_features), (module.out_features, rank)
        else:
            down, up = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        tensors[f"{name}.lora_down.weight"] = torch.randn(down, generator=g) * 0.2
        tensors[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * 0.2
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return tensors


def _closed_form(model: SDModel, files: list[dict[str, torch.Tensor]], muls: list[float]) -> None:
    """W <- W + sum_i mul_i * alpha/rank * up @ down, in place, by hand."""
    with torch.no_grad():
        for tensors, mul in zip(files, muls):
            for key in [k for k in tensors if k.endswith(".alpha")]:
                name = key[: -len(".alpha")]
                down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
                weight = _module(model, name).weight
                delta = up.flatten(1) @ down.flatten(1)  # (out, rank) @ (rank, in * kh * kw)
                weight += mul * tensors[key].item() / down.shape[0] * delta.reshape(weight.shape)


def test_kohya_fixture_applies_as_the_closed_form(tiny_sd1, tmp_path):
    probe = load_sd_model(str(tiny_sd1))
    fixture = tmp_path / "elsewhere.safetensors"
    tensors = _write_fixture(probe, fixture, FIXTURE_LAYERS, seed=1)
    inputs = _unet_input(probe)
    base_unet, base_text = _unet_out(probe.unet, inputs), _text_out(probe)

    expected = load_sd_model(str(tiny_sd1))
    _closed_form(expected, [tensors], [0.7])
    ours = load_sd_model(str(tiny_sd1))
    apply_lora_files(ours, [str(fixture)], [0.7])

    want_unet, want_text = _unet_out(expected.unet, inputs), _text_out(expected)
    assert (want_unet - base_unet).abs().max() > 1e-2 and (want_text - base_text).abs().max() > 1e-2
    torch.testing.assert_close(_unet_out(ours.unet, inputs), want_unet, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_text_out(ours), want_text, atol=1e-5, rtol=1e-5)


def test_kohya_fixture_equals_diffusers_where_diffusers_is_exact(tiny_sd1, tmp_path):
    """diffusers 0.42 keeps per-layer alphas only outside attention blocks and loads no kohya
    text-encoder layers under transformers 5; on a UNet file with one attention alpha (!= rank)
    and other conv alphas it is exact, and ours must agree with it and with the closed form."""
    probe = load_sd_model(str(tiny_sd1))
    layers = {k: ((v[0], 1.0) if "_attentions_" in k else v) for k, v in FIXTURE_LAYERS.items() if k.startswith("lora_unet_")}
    fixture = tmp_path / "uniform.safetensors"
    tensors = _write_fixture(probe, fixture, layers, seed=4)
    inputs = _unet_input(probe)

    expected = load_sd_model(str(tiny_sd1))
    _closed_form(expected, [tensors], [1.3])
    ours = load_sd_model(str(tiny_sd1))
    apply_lora_files(ours, [str(fixture)], [1.3])
    theirs = load_sd_model(str(tiny_sd1))
    _diffusers_load(theirs, [fixture], [1.3])

    want = _unet_out(expected.unet, inputs)
    torch.testing.assert_close(_unet_out(theirs.unet, inputs), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_unet_out(ours.unet, inputs), want, atol=1e-5, rtol=1e-5)


def test_two_files_mix_linearly_with_their_multipliers(tiny_sd1, tmp_path):
    """A kohya file and a diffusers-format file (peft keys, alpha = rank) on the same model."""
    probe = load_sd_model(str(tiny_sd1))
    first = _write_fixture(probe, tmp_path / "a.safetensors", FIXTURE_LAYERS, seed=1)
    # The second overlaps the first on some layers and adds another; alpha = rank, as diffusers files imply.
    other = {k: (v[0], float(v[0])) for k, v in list(FIXTURE_LAYERS.items())[:10:2]}
    other["lora_unet_down_blocks_2_attentions_0_proj_out"] = (4, 4.0)
    second = _write_fixture(probe, tmp_path / "b-kohya.safetensors", other, seed=2)
    paths = {name: next(p for p, m in probe.unet.named_modules() if p.replace(".", "_") == name[len("lora_unet_"):]) for name in other}
    peft_keys = {}
    for name, path in paths.items():
        peft_keys[f"unet.{path}.lora_A.weight"] = second[f"{name}.lora_down.weight"]
        peft_keys[f"unet.{path}.lora_B.weight"] = second[f"{name}.lora_up.weight"]
    save_file(peft_keys, str(tmp_path / "b-diffusers.safetensors"))

    expected = load_sd_model(str(tiny_sd1))
    _closed_form(expected, [first, second], [0.5, -1.2])
    ours = load_sd_model(str(tiny_sd1))
    apply_lora_files(ours, [str(tmp_path / "a.safetensors"), str(tmp_path / "b-diffusers.safetensors")], [0.5, -1.2])
    inputs = _unet_input(probe)
    torch.testing.assert_close(_unet_out(ours.unet, inputs), _unet_out(expected.unet, inputs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_text_out(ours), _text_out(expected), atol=1e-5, rtol=1e-5)


def test_lora_for_another_model_is_a_clear_error(tiny_sd1, tiny_sd2, tmp_path):
    sd2 = load_sd_model(str(tiny_sd2))
    wrong = tmp_path / "for-sd2.safetensors"
    _write_fixture(sd2, wrong, {k: v for k, v in FIXTURE_LAYERS.items() if "attn2_to_k" in k}, seed=3)
    with pytest.raises(UserError, match=r"for-sd2\.safetensors: .*attn2_to_k does not fit this model"):
        apply_lora_files(load_sd_model(str(tiny_sd1)), [str(wrong)], [1.0])

    unknown = tmp_path / "other-arch.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(unknown))
    with pytest.raises(UserError, match=r"other-arch\.safetensors: 1 of 1 LoRA layers match no layer"):
        apply_lora_files(load_sd_model(str(tiny_sd1)), [str(unknown)], [1.0])
    with pytest.raises(UserError, match="LoRA file not found: .*missing.safetensors"):
        apply_lora_files(load_sd_model(str(tiny_sd1)), [str(tmp_path / "missing.safetensors")], [1.0])


def test_two_kohya_files_stack(tiny_sd1, tmp_path):
    """gen_pfg.py --network_weights a b: the second file finds the layers the first one wrapped."""
    probe = load_sd_model(str(tiny_sd1))
    first = _write_fixture(probe, tmp_path / "a.safetensors", FIXTURE_LAYERS, seed=5)
    second = _write_fixture(probe, tmp_path / "b.safetensors", dict(list(FIXTURE_LAYERS.items())[::3]), seed=6)
    expected = load_sd_model(str(tiny_sd1))
    _closed_form(expected, [first, second], [1.0, 0.25])
    ours = load_sd_model(str(tiny_sd1))
    apply_lora_files(ours, [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], [1.0, 0.25])
    inputs = _unet_input(probe)
    torch.testing.assert_close(_unet_out(ours.unet, inputs), _unet_out(expected.unet, inputs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_text_out(ours), _text_out(expected), atol=1e-5, rtol=1e-5)
