"""SDXL through every stage, on the tiny SDXL-architecture model (issue 8)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.assertions import assert_same_output, assert_same_weights


def test_tiny_sdxl_kit_is_an_sdxl_pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == pipe.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert len(pipe.vae.config.block_out_channels) == 4
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def _unet_inputs(unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.tensor([[96.0, 80, 8, 0, 64, 64]])}
    return torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 9, config.cross_attention_dim, generator=g), added


@torch.no_grad()
def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    latents, context, added = _unet_inputs(unet, seed)
    return unet(latents, torch.tensor([500]), context, added_cond_kwargs=added).sample


@pytest.fixture(scope="module")
def sdxl_model(tiny_sdxl):
    from library.models.loading import load_sd_model

    return load_sd_model(str(tiny_sdxl))


def test_single_file_round_trip(tiny_sdxl, sdxl_model, tmp_path):
    """Our export -> our loader and diffusers from_single_file give the identical UNet (and text encoders)."""
    import diffusers
    from safetensors.torch import load_file, save_file

    from library.models.loading import load_sd_model
    from library.models.sdxl_checkpoint import save_sdxl_single_file

    m = sdxl_model
    assert m.variant == "sdxl" and m.cross_attention_dim == 96 and m.tokenizer_2.pad_token == "!"
    scheduler = diffusers.EulerDiscreteScheduler.from_config(m.scheduler_config)
    path = save_sdxl_single_file(tmp_path / "xl.safetensors", m.unet, m.vae, m.text_encoder, m.text_encoder_2, scheduler=scheduler)
    keys = load_file(str(path)).keys()
    assert "model.diffusion_model.label_emb.0.0.weight" in keys and "model.diffusion_model.input_blocks.4.1.proj_in.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys and "first_stage_model.decoder.conv_out.weight" in keys

    expected = _unet_out(m.unet)
    ours = load_sd_model(str(path))
    assert ours.variant == "sdxl"
    assert_same_weights(m.unet, ours.unet)
    assert_same_output(_unet_out(ours.unet), expected)
    ids = torch.randint(0, 49406, (1, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_same_output(ours.text_encoder_2(ids).text_embeds, m.text_encoder_2(ids).text_embeds)
    theirs = diffusers.StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl), local_files_only=True)
    assert_same_weights(m.unet, theirs.unet)
    assert_same_output(_unet_out(theirs.unet), expected)
    with torch.no_grad():
        assert_same_output(theirs.text_encoder_2(ids).text_embeds, m.text_encoder_2(ids).text_embeds)
        assert_same_output(theirs.text_encoder(ids).last_hidden_state, m.text_encoder(ids).last_hidden_state)

    # A file made elsewhere (no embedded configs) builds from the tensor shapes alone.
    save_file(dict(load_file(str(path))), str(tmp_path / "foreign.safetensors"))
    foreign = load_sd_model(str(tmp_path / "foreign.safetensors"))
    assert list(foreign.unet.config.transformer_layers_per_block) == [1, 1, 2]
    assert foreign.unet.config.addition_time_embed_dim == 8 and foreign.vae.config.scaling_factor == 0.13025
    assert foreign.text_encoder_2.config.num_hidden_layers == 4 and not foreign.v_prediction


def test_text_states_and_pooled_match_diffusers(tiny_sdxl, sdxl_model):
    """Penultimate layers of both encoders, concatenated; bigG's pooled vector; 75-token chunks."""
    from diffusers import StableDiffusionXLPipeline

    from library.models.text_sdxl import SDXLPromptEncoder

    encoder = sdxl_model.prompt_encoder()
    assert isinstance(encoder, SDXLPromptEncoder) and encoder.width == 96 and encoder.pooled_width == 64
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    with torch.no_grad():
        expected, _, pooled, _ = pipe.encode_prompt("a cat, sitting", do_classifier_free_guidance=False)
        states, ours_pooled = encoder.encode_pooled(["a cat, sitting"], weighted=True)
    assert torch.equal(states, expected) and torch.equal(ours_pooled, pooled)
    # bigG sees the same chunks padded with "!" after EOS
    ids = encoder.tokenize(["a cat"]).ids[0]
    assert ids[0, 4:].eq(encoder.eos).all() and encoder._ids_2(ids)[0, 4:].eq(0).all() and encoder._ids_2(ids)[0, 3] == encoder.eos
    # --max_token_length 225: three chunks for both encoders; the pooled vector is the first chunk's
    long = sdxl_model.prompt_encoder(max_token_length=225)
    with torch.no_grad():
        states, long_pooled = long.encode_pooled(["a cat, sitting"])
    assert states.shape == (1, 231, 96) and torch.allclose(long_pooled, pooled, atol=1e-6)
    assert torch.allclose(states[:, :77], expected, atol=1e-6)


# ---------------------------------------------------------------------------------- training


def _train(model, dataset, out, *extra: str) -> None:
    import train_pfg

    args = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(dataset), "--output_dir", str(out),
            "--output_name", "t", "--seed", "1", "--learning_rate", "1e-3", "--pfg_learning_rate", "1e-2",
            "--pfg_num_tokens", "2", "--optimizer_type", "AdamW", *extra]
    assert train_pfg.main(args) == 0


@pytest.fixture(scope="module")
def trained_lora(tiny_sdxl, prepared_dataset, tmp_path_factory):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("sdxl-lora")
    _train(tiny_sdxl, prepared_dataset, out, "--train_unet", "lora", "--max_train_steps", "2", "--network_dim", "4",
           "--network_alpha", "2", "--network_conv_dim", "2", "--learning_rate", "5e-2", "--cache_latents")
    AcceleratorState._reset_state(True)
    return out / "t-lora.safetensors"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_full_mode_saves_an_sdxl_single_file(tiny_sdxl, tiny_tagger, sdxl_model, prepared_dataset, tmp_path, fresh_accelerate_state):
    """Full fine-tune, with training samples (a guide image) and validation on the way."""
    from library.models.loading import load_sd_model
    from library.models.pfg import load_pfg

    guide = next((prepared_dataset.parent / "demo-data" / "images").glob("*.png"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"illustration of * --i {guide} --w 64 --h 64 --s 2 --d 7\n")
    _train(tiny_sdxl, prepared_dataset, tmp_path, "--train_unet", "full", "--max_train_steps", "2",
           "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--tagger_model", str(tiny_tagger),
           "--validation_split", "0.2", "--validation_every_n_steps", "2", "--validation_timesteps", "2",
           "--validation_candidates", "2")
    assert [p.name for p in (tmp_path / "sample").iterdir()] == ["t_000002_00_7.png"]
    adapter, meta = load_pfg(tmp_path / "t-pfg.safetensors")
    assert adapter.shape.cross_attention_dim == 96 and meta["pfg.pooled"] == "0"  # C read from the SDXL UNet
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/pfg"
    trained = load_sd_model(str(tmp_path / "t.safetensors"))
    assert trained.variant == "sdxl"
    assert not torch.equal(_unet_out(trained.unet), _unet_out(sdxl_model.unet))


def test_pfg_only_mode_with_pooled_head(tiny_sdxl, prepared_dataset, tmp_path, fresh_accelerate_state):
    """--pfg_pooled: the head also learns a vector added to the pooled text embedding (from zero)."""
    from library.models.pfg import load_pfg

    _train(tiny_sdxl, prepared_dataset, tmp_path, "--train_unet", "none", "--max_train_steps", "2", "--pfg_pooled",
           "--pfg_dropout", "0.5", "--max_token_length", "150", "--mixed_precision", "bf16",
           "--vae", str(tiny_sdxl / "vae"), "--gradient_checkpointing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-pfg.safetensors", "t-settings.toml"]
    adapter, meta = load_pfg(tmp_path / "t-pfg.safetensors")
    assert meta["pfg.pooled"] == "64" and adapter.shape.pooled_dim == 64
    assert adapter.pfg_pooled.weight.abs().sum() > 0  # trained away from its zero start
    features = torch.randn(3, adapter.shape.input_dim)
    assert adapter.pooled(features, 0.5).shape == (3, 64)
    assert torch.allclose(adapter.pooled(features, 0.5), 0.5 * adapter.pooled(features))


def test_pfg_pooled_needs_sdxl(tiny_sd1, prepared_dataset, tmp_path, fresh_accelerate_state):
    from library.errors import UserError

    with pytest.raises(UserError, match="--pfg_pooled needs an SDXL model"):
        _train(tiny_sd1, prepared_dataset, tmp_path, "--train_unet", "none", "--max_train_steps", "1", "--pfg_pooled")


def test_lora_has_kohya_sdxl_names_and_loads_in_diffusers(tiny_sdxl, sdxl_model, trained_lora):
    """kohya's SGM layer names; diffusers load_lora_weights reads the file, changes the UNet, and
    agrees with our in-process loader."""
    import copy

    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from library.models.lora import apply_lora_files

    from safetensors import safe_open

    with safe_open(str(trained_lora), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    keys = load_file(str(trained_lora)).keys()
    names = {k.split(".")[0] for k in keys}
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_")) for n in names)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2" in names
    assert "lora_unet_output_blocks_2_2_conv" in names and "lora_unet_input_blocks_1_0_in_layers_2" in names

    base = _unet_out(sdxl_model.unet)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.load_lora_weights(str(trained_lora))
    theirs = _unet_out(pipe.unet)
    assert (theirs - base).abs().max() > 1e-4
    ours_model = copy.deepcopy(sdxl_model)
    apply_lora_files(ours_model, [str(trained_lora)], [1.0])
    assert torch.allclose(_unet_out(ours_model.unet), theirs, atol=1e-5)


def test_time_ids_are_what_the_bucketer_recorded(prepared_dataset):
    """A bucketed, center-cropped image conditions on (original h, w, crop top, left, bucket h, w)."""
    from library.data.dataset import PFGDataset, collate, collect_items, load_features
    from library.data.dataset_config import load_dataset_config

    items, _ = collect_items(load_dataset_config(prepared_dataset), "illustration of *")
    features, _ = load_features(items)
    cropped = [i for i, item in enumerate(items) if item.assignment.crop_ltrb[:2] != (0, 0)]
    assert cropped, "the demo dataset should contain an image the bucket crops"
    index = cropped[0]
    item = items[index]
    left, top, _, _ = item.assignment.crop_ltrb
    batch = collate([PFGDataset(items, features)[(index, 0)]])
    (w, h), (bw, bh) = item.original_size, item.assignment.bucket
    assert batch["time_ids"].tolist() == [[h, w, top, left, bh, bw]]


# -------------------------------------------------------------------------------- generation
def _pixels(path_or_image):
    import numpy as np
    from PIL import Image

    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def sdxl_gen_kit(tiny_sdxl, tiny_tagger, tmp_path_factory):
    """A random SDXL PFG head (tokens as large as text states, and a pooled output) and guide images."""
    import numpy as np
    from PIL import Image

    from library.models.image_encoders import load_encoder
    from library.models.pfg import PFGAdapter, PFGShape, pfg_metadata, save_pfg

    root = tmp_path_factory.mktemp("sdxl-gen")
    encoder = load_encoder(str(tiny_tagger))
    torch.manual_seed(0)
    adapter = PFGAdapter(PFGShape(4, 768, 96, pooled_dim=64))
    torch.nn.init.normal_(adapter.pfg_linear.weight, std=3.0 / 768**0.5)
    torch.nn.init.normal_(adapter.pfg_pooled.weight, std=3.0 / 768**0.5)
    pfg = save_pfg(adapter, root / "xl-pfg.safetensors", pfg_metadata(adapter.shape, encoder.encoder_id))[0]
    guides = []
    for seed in range(2):
        pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        guides.append(root / f"guide{seed}.png")
        Image.fromarray(pixels).resize((96, 80), Image.Resampling.NEAREST).save(guides[-1])
    return {"model": tiny_sdxl, "tagger": tiny_tagger, "pfg": pfg, "guides": guides, "root": root}


def _gen(kit, outdir, *args) -> list:
    import gen_pfg

    argv = ["--pretrained_model_name_or_path", str(kit["model"]), "--outdir", str(outdir), "--W", "64", "--H", "64",
            "--steps", "2", "--pfg_weights", str(kit["pfg"]), "--tagger_model", str(kit["tagger"]), *map(str, args)]
    assert gen_pfg.main(argv) == 0
    return sorted(p for p in outdir.glob("*.png") if not p.name.startswith("grid"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gen_pfg_scale_zero_equals_plain_sdxl_pipeline_and_guides_change_it(sdxl_gen_kit, tmp_path):
    import numpy as np
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    kit = sdxl_gen_kit
    common = ["--prompt", "a red cat, (sitting:1.0)", "--negative_prompt", "blurry", "--sampler", "euler_a", "--seed", "3"]
    (off,) = _gen(kit, tmp_path / "off", *common, "--image", kit["guides"][0], "--pfg_scale", "0")
    pipe = StableDiffusionXLPipeline.from_pretrained(kit["model"], local_files_only=True, add_watermarker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe("a red cat, sitting", negative_prompt="blurry", width=64, height=64, num_inference_steps=2,
                 guidance_scale=7.0, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(_pixels(off), _pixels(plain))

    (guided,) = _gen(kit, tmp_path / "on", *common, "--image", kit["guides"][0])
    (other,) = _gen(kit, tmp_path / "other", *common, "--image", kit["guides"][1])
    assert np.abs(_pixels(guided) - _pixels(off)).mean() > 1
    assert np.abs(_pixels(guided) - _pixels(other)).mean() > 1


@torch.no_grad()
def test_sampler_conditioning_for_sdxl(sdxl_gen_kit, sdxl_model):
    """Tokens after the weighted text states; the pooled head output on the guided branch only."""
    from library.models.image_encoders import load_encoder
    from library.models.pfg import load_pfg
    from library.sample.sampler import Guide, PFGSampler, SampleRequest

    adapter, _ = load_pfg(sdxl_gen_kit["pfg"])
    sampler = PFGSampler(sdxl_model, adapter, load_encoder(str(sdxl_gen_kit["tagger"])))
    request = SampleRequest(prompt="a (cat:1.3)", negative_prompt="", guides=(Guide(str(sdxl_gen_kit["guides"][0])),))
    cond, uncond = sampler.embeddings(request)
    assert cond.shape == uncond.shape == (1, 77 + 4, 96) and uncond[:, 77:].abs().sum() == 0
    states, pooled = sampler.prompt_encoder.encode_pooled(["a (cat:1.3)", ""], weighted=True)
    assert torch.equal(cond[:, :77], states[:1])
    cond_pooled, uncond_pooled = sampler.pooled_embeddings(request)
    feature = sampler.feature_of(str(sdxl_gen_kit["guides"][0]))
    assert torch.allclose(cond_pooled, pooled[:1] + adapter.pooled(feature[None]), atol=1e-6)
    assert torch.allclose(uncond_pooled, pooled[1:], atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_eval_pfg_runs_on_sdxl(sdxl_gen_kit, prepared_dataset, tmp_path):
    import eval_pfg

    out = tmp_path / "eval.json"
    assert eval_pfg.main([
        "--pretrained_model_name_or_path", str(sdxl_gen_kit["model"]), "--pfg_weights", str(sdxl_gen_kit["pfg"]),
        "--tagger_model", str(sdxl_gen_kit["tagger"]), "--dataset_config", str(prepared_dataset), "--output_json", str(out),
        "--num_timesteps", "2", "--candidates", "2", "--steps", "2", "--images_per_guide", "1",
    ]) == 0
    result = json.loads(out.read_text())
    assert result["denoising"]["candidates"] == 2 and result["generation"] is not None
    # no --W/--H: each guide's size comes from the model, as in gen_pfg.py (the SDXL bucket set at its native area)
    native = json.loads((sdxl_gen_kit["model"] / "unet" / "config.json").read_text())["sample_size"] * 8
    assert result["generation"]["sizes"]
    for size in result["generation"]["sizes"]:
        w, h = map(int, size.split("x"))
        assert w % 8 == 0 and h % 8 == 0 and 0.8 * native**2 <= w * h <= 1.1 * native**2, (size, native)


def test_sdxl_vae_stays_fp32_under_fp16_unless_a_fixed_vae_is_given(sdxl_model):
    import copy

    from library.train.settings import TrainSettings
    from library.train.setup import prepare_sd_model

    for vae, expected in (("", torch.float32), ("fixed-vae", torch.float16)):
        model = copy.deepcopy(sdxl_model)
        settings = TrainSettings(pretrained_model_name_or_path="x", train_unet="none", mixed_precision="fp16", vae=vae)
        prepare_sd_model(model, settings, torch.device("cpu"))
        assert next(model.vae.parameters()).dtype == expected
        assert next(model.text_encoder_2.parameters()).dtype == torch.float16
        assert not any(p.requires_grad for p in model.text_encoder_2.parameters())


def test_kohya_sdxl_lora_with_both_text_encoders_loads(sdxl_model, trained_lora, tmp_path):
    """Files made by kohya for SDXL also carry lora_te1_* (CLIP-L) and lora_te2_* (bigG) layers."""
    import copy

    from safetensors.torch import load_file, save_file

    from library.models.lora import apply_lora_files

    tensors = dict(load_file(str(trained_lora)))
    g = torch.Generator().manual_seed(0)
    for name, width in (("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32),
                        ("lora_te2_text_model_encoder_layers_1_mlp_fc1", 64)):
        out = width * 4 if "fc1" in name else width
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, width, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 2, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "kohya-xl.safetensors"
    save_file(tensors, str(path))
    model = copy.deepcopy(sdxl_model)
    apply_lora_files(model, [str(path)], [1.0])
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    with torch.no_grad():
        for before, after in ((sdxl_model.text_encoder, model.text_encoder), (sdxl_model.text_encoder_2, model.text_encoder_2)):
            assert not torch.allclose(before(ids).last_hidden_state, after(ids).last_hidden_state)


def test_unet_key_map_agrees_with_diffusers_at_real_sdxl_size():
    """The real SDXL base geometry (meta device: 0/2/10 transformer layers, label_emb) maps as
    diffusers' own converter reads it, and our LoRA names are kohya's for the real layout."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from library.models.ldm_keys import UNET_PREFIX, unet_key_map
    from library.models.lora import module_names
    from library.models.sdxl_checkpoint import UNET_DEFAULTS

    config = {**UNET_DEFAULTS, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 2048,
              "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
              "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    keys = list(unet.state_dict())
    assert len(keys) == 1680
    our_map = unet_key_map(keys)
    names = sorted(our_map[k] for k in keys)
    checkpoint = {UNET_PREFIX + n: torch.full((1, 1, 1, 1), float(i)) for i, n in enumerate(names)}
    back = convert_ldm_unet_checkpoint(checkpoint, config=config)
    assert set(back) == set(keys)
    assert all(names[int(v.flatten()[0])] == our_map[k] for k, v in back.items())
    lora = module_names(unet)
    assert lora["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"] == "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k"
    assert lora["up_blocks.0.attentions.2.proj_out"] == "lora_unet_output_blocks_2_1_proj_out"
    assert lora["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"] == "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj"


def test_sdxl_diffusers_folder_and_ckpt_exports_load_back(sdxl_model, tmp_path):
    import diffusers

    from library.models.loading import load_sd_model
    from library.models.sdxl_checkpoint import save_sdxl_diffusers, save_sdxl_single_file

    m = sdxl_model
    scheduler = diffusers.EulerDiscreteScheduler.from_config(m.scheduler_config)
    folder = save_sdxl_diffusers(tmp_path / "xl", m.unet, m.vae, m.text_encoder, m.text_encoder_2, m.tokenizer,
                                 m.tokenizer_2, scheduler, torch.float16)
    from_folder = load_sd_model(str(folder))
    assert from_folder.variant == "sdxl" and from_folder.tokenizer_2.pad_token == "!"
    assert next(m.unet.parameters()).dtype == torch.float32  # the caller's model was not cast
    assert torch.allclose(_unet_out(from_folder.unet.float()), _unet_out(m.unet), atol=1e-2)
    ckpt = save_sdxl_single_file(tmp_path / "xl.ckpt", m.unet, m.vae, m.text_encoder, m.text_encoder_2, scheduler=scheduler)
    from_ckpt = load_sd_model(str(ckpt)).unet
    assert_same_weights(m.unet, from_ckpt)
    assert_same_output(_unet_out(from_ckpt), _unet_out(m.unet))


def test_lora_training_continues_an_sdxl_lora(tiny_sdxl, prepared_dataset, trained_lora, tmp_path, fresh_accelerate_state):
    from safetensors.torch import load_file

    _train(tiny_sdxl, prepared_dataset, tmp_path, "--train_unet", "lora", "--max_train_steps", "1",
           "--network_weights", str(trained_lora), "--learning_rate", "5e-2")
    before, after = load_file(str(trained_lora)), load_file(str(tmp_path / "t-lora.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_up.weight"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gen_img2img_and_lora_on_sdxl(sdxl_gen_kit, trained_lora, tmp_path):
    common = ["--prompt", "a cat", "--seed", "5", "--sampler", "ddim", "--steps", "4", "--image", sdxl_gen_kit["guides"][0]]
    (plain,) = _gen(sdxl_gen_kit, tmp_path / "a", *common, "--init_image", sdxl_gen_kit["guides"][1], "--strength", "0.5")
    (lora,) = _gen(sdxl_gen_kit, tmp_path / "b", *common, "--init_image", sdxl_gen_kit["guides"][1], "--strength", "0.5",
                   "--network_weights", trained_lora, "--network_mul", "2")
    assert _pixels(plain).shape == (64, 64, 3)
    assert abs(_pixels(plain) - _pixels(lora)).mean() > 0.5


def test_sdxl_size_kit_has_sdxl_base_parameter_counts():
    """The benchmark variant (`--variant sdxl-size`) is SDXL base's architecture at full size."""
    from accelerate import init_empty_weights

    from tools.make_tiny_sd import XL_SIZES, build_sdxl_text_encoders, build_sdxl_unet, build_vae

    size = XL_SIZES["sdxl-size"]
    with init_empty_weights():
        models = [build_sdxl_unet(0, size), *build_sdxl_text_encoders(0, 0, size), build_vae(0, size.vae_channels, size.norm_groups)]
    counts = [sum(p.numel() for p in m.parameters()) for m in models]
    assert counts == [2_567_463_684, 123_060_480, 694_659_840, 83_653_863]
    assert models[0].config.cross_attention_dim == 2048 and models[0].config.projection_class_embeddings_input_dim == 2816


def test_sdxl_refiner_file_is_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    from library.errors import UserError
    from library.models.loading import load_sd_model

    path = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.text_projection": torch.zeros(2, 2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(path))
    with pytest.raises(UserError, match="refiner"):
        load_sd_model(str(path))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("optimizer", ["AdamW8bit", "Adafactor"])
def test_full_fine_tune_in_the_24gb_configuration(tiny_sdxl, sdxl_model, prepared_dataset, tmp_path, fresh_accelerate_state, optimizer):
    """The SDXL full fine-tune that fits 24 GB: bf16 weights (--full_bf16), gradient checkpointing,
    and an 8-bit AdamW or Adafactor; the UNet trains and saves as an SDXL single file."""
    from safetensors import safe_open

    from library.models.loading import load_sd_model

    _train(tiny_sdxl, prepared_dataset, tmp_path, "--train_unet", "full", "--max_train_steps", "1",
           "--mixed_precision", "bf16", "--full_bf16", "--gradient_checkpointing", "--optimizer_type", optimizer)
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_full_bf16"] == "True" and meta["ss_optimizer"] == optimizer
    trained = load_sd_model(str(tmp_path / "t.safetensors"))
    assert trained.variant == "sdxl"
    out = _unet_out(trained.unet.float())
    assert torch.isfinite(out).all() and not torch.allclose(out, _unet_out(sdxl_model.unet), atol=1e-3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_foreign_single_file_loads_offline_and_a_v_pred_key_means_v_prediction(sdxl_model, sdxl_gen_kit, tmp_path, network_blocked):
    """A single file made elsewhere (no embedded configs) needs nothing from the network: configs
    from the tensors, both tokenizers from the bundled vocabulary. NoobAI-style v-prediction files
    carry an empty `v_pred` tensor, which selects v-prediction unless the user's flag says otherwise."""
    import diffusers
    from safetensors.torch import load_file, save_file

    from library.models.loading import load_sd_model
    from library.models.sdxl_checkpoint import save_sdxl_single_file

    m = sdxl_model
    scheduler = diffusers.EulerDiscreteScheduler.from_config(m.scheduler_config)
    ours = save_sdxl_single_file(tmp_path / "ours.safetensors", m.unet, m.vae, m.text_encoder, m.text_encoder_2, scheduler=scheduler)
    tensors = dict(load_file(str(ours)))
    save_file(tensors, str(tmp_path / "eps.safetensors"))  # no metadata: nothing but tensors
    save_file({**tensors, "v_pred": torch.tensor([])}, str(tmp_path / "vpred.safetensors"))

    eps, vpred = load_sd_model(str(tmp_path / "eps.safetensors")), load_sd_model(str(tmp_path / "vpred.safetensors"))
    assert not eps.v_prediction and vpred.v_prediction and vpred.variant == "sdxl"
    assert not load_sd_model(str(tmp_path / "vpred.safetensors"), v_prediction=False).v_prediction  # the flag wins
    assert vpred.tokenizer_2.pad_token == "!" and vpred.tokenizer.pad_token == "<|endoftext|>"
    assert vpred.tokenizer("a cat").input_ids == m.tokenizer("a cat").input_ids
    assert_same_weights(m.unet, vpred.unet)

    kit = {**sdxl_gen_kit, "model": tmp_path / "vpred.safetensors"}
    (image,) = _gen(kit, tmp_path / "out", "--image", kit["guides"][0], "--seed", "1")
    assert _pixels(image).shape == (64, 64, 3)
    assert network_blocked == []  # no socket, no hub call, caught or not
