"""Single-file checkpoints: exact-weight round trips through our loader and diffusers, real key names,
offline loading, pickle refusal, clear errors and save precision."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.models.checkpoints import (
    bundled_config,
    detect_architecture,
    load_single_file,
    load_vae,
    read_state_dict,
    save_diffusers,
    save_single_file,
)
from library.errors import UserError
from library.models.ldm_keys import UNET_PREFIX, VAE_PREFIX, text_encoder_to_ldm, unet_key_map, vae_key_map
from tests.assertions import assert_same_output, assert_same_weights

VARIANTS = ["sd1", "sd2"]


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """Per variant: the tiny diffusers pipeline, its folder and its single-file export."""
    from diffusers import StableDiffusionPipeline

    out = {}
    folder_out = tmp_path_factory.mktemp("single")
    for variant in VARIANTS:
        folder = request.getfixturevalue(f"tiny_{variant}")
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        path = save_single_file(folder_out / f"{variant}.safetensors", pipe.unet, pipe.vae, pipe.text_encoder,
                                variant, scheduler=pipe.scheduler)
        out[variant] = (folder, pipe, path)
    return out


def _inputs(pipe, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 9, pipe.unet.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    return latents, context, ids


@torch.no_grad()
def _assert_same_models(pipe, unet, vae, text_encoder):
    latents, context, ids = _inputs(pipe)
    t = torch.tensor([500])
    for want, got in [(pipe.unet, unet), (pipe.vae, vae), (pipe.text_encoder, text_encoder)]:
        assert_same_weights(want, got)
    assert_same_output(unet(latents, t, context).sample, pipe.unet(latents, t, context).sample)
    assert_same_output(vae.decode(latents).sample, pipe.vae.decode(latents).sample)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert_same_output(vae.encode(image).latent_dist.mean, pipe.vae.encode(image).latent_dist.mean)
    a, b = pipe.text_encoder(ids, output_hidden_states=True), text_encoder(ids, output_hidden_states=True)
    assert_same_output(b.last_hidden_state, a.last_hidden_state)
    assert_same_output(b.hidden_states[-2], a.hidden_states[-2])  # clip skip 2 sees the same layer


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_through_our_loader(exported, variant):
    _, pipe, path = exported[variant]
    unet, vae, text_encoder, tokenizer, scheduler, info = load_single_file(path)
    assert info.architecture == variant
    assert info.prediction_type == pipe.scheduler.config.prediction_type
    assert type(scheduler) is type(pipe.scheduler)
    assert tokenizer.pad_token == ("<|endoftext|>" if variant == "sd1" else "!")
    assert tokenizer("a cat").input_ids == pipe.tokenizer("a cat").input_ids
    _assert_same_models(pipe, unet, vae, text_encoder)


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_from_single_file_loads_our_export(exported, variant):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder, pipe, path = exported[variant]
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet",
                                                 local_files_only=True)
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    _assert_same_models(pipe, unet, loaded.vae, loaded.text_encoder)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ckpt_round_trip(exported, variant, tmp_path):
    _, pipe, _ = exported[variant]
    path = save_single_file(tmp_path / "model.ckpt", pipe.unet, pipe.vae, pipe.text_encoder, variant)
    assert set(torch.load(path, weights_only=True)) == {"state_dict", "metadata"}
    unet, vae, text_encoder, *_ = load_single_file(path)
    _assert_same_models(pipe, unet, vae, text_encoder)


def test_key_names_are_the_real_ldm_names(exported):
    sd1, _ = read_state_dict(exported["sd1"][2])
    sd2, _ = read_state_dict(exported["sd2"][2])
    for key in [
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.7.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.norm_out.weight",
        "first_stage_model.post_quant_conv.weight",
    ]:
        assert key in sd1 and key in sd2, key
    assert sd1["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # LDM stores 1x1 convs
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd1
    assert "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight" in sd1
    assert sd1["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert sd1["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 4  # SD1: conv projection
    assert sd2["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # SD2: linear projection
    hidden = 64
    assert sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * hidden, hidden)
    # the tiny encoder has 4 layers; the file carries OpenCLIP's unused last one as well (kohya's export)
    assert "cond_stage_model.model.transformer.resblocks.4.mlp.c_proj.weight" in sd2
    for key in ["token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection", "logit_scale"]:
        assert "cond_stage_model.model." + key in sd2
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd2)


def _ldm_names_by_diffusers(converter, diffusers_keys, our_map, prefix, **kwargs):
    """Run diffusers' own LDM->diffusers converter over our names; each id must come back to its key."""
    names = sorted(our_map[k] for k in diffusers_keys)
    checkpoint = {prefix + n: torch.full((1, 1, 1, 1), float(i)) for i, n in enumerate(names)}
    back = converter(checkpoint, **kwargs)
    assert set(back) == set(diffusers_keys)
    for key, value in back.items():
        assert names[int(value.flatten()[0])] == our_map[key], key


@pytest.mark.parametrize("variant", VARIANTS)
def test_key_maps_agree_with_diffusers_at_real_size(variant):
    """The real SD1.5/SD2.1 geometry (built on the meta device) maps like diffusers' converters say."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet_config, vae_config = bundled_config(variant, "unet"), bundled_config(variant, "vae")
    with init_empty_weights():
        unet_keys = list(UNet2DConditionModel.from_config(unet_config).state_dict())
        vae_keys = list(AutoencoderKL.from_config(vae_config).state_dict())
    assert len(unet_keys) == 686 and len(vae_keys) == 248
    _ldm_names_by_diffusers(convert_ldm_unet_checkpoint, unet_keys, unet_key_map(unet_keys), UNET_PREFIX,
                            config=unet_config)
    _ldm_names_by_diffusers(convert_ldm_vae_checkpoint, vae_keys, vae_key_map(vae_keys), VAE_PREFIX,
                            config=vae_config)


def test_real_size_sd2_text_encoder_keys():
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        model = CLIPTextModel(CLIPTextConfig.from_dict(bundled_config("sd2", "text_encoder")))
    sd = {k: torch.zeros(v.shape, device="meta") for k, v in model.state_dict().items()}
    ldm = text_encoder_to_ldm(sd, "sd2")
    assert ldm["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    assert "cond_stage_model.model.transformer.resblocks.23.ln_2.bias" in ldm  # OpenCLIP ViT-H has 24 layers
    assert "cond_stage_model.model.transformer.resblocks.24.ln_2.bias" not in ldm


def test_loads_with_networking_disabled(exported, network_blocked):
    """Single files load from the tensors and the bundled configs and vocabulary: no socket, no hub
    call (network_blocked fails the test if anything tried, caught or not)."""
    for variant in VARIANTS:
        unet, vae, text_encoder, tokenizer, scheduler, info = load_single_file(exported[variant][2])
        assert info.architecture == variant
    assert network_blocked == []


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")  # would create the marker file when unpickled


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_malicious_pickle_is_refused(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(marker)}}, f, protocol=2)
    torch.save({"state_dict": {"x": _Payload(marker)}}, tmp_path / f"evil2{suffix}")
    for p in (path, tmp_path / f"evil2{suffix}"):
        with pytest.raises(UserError, match="refused to load") as e:
            load_single_file(p)
        assert str(p) in str(e.value) and "weights_only" in str(e.value)
    assert not marker.exists()


def test_unrelated_tensors_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"classifier.weight": torch.zeros(3, 4)}, str(path))
    with pytest.raises(UserError, match="not a Stable Diffusion checkpoint") as e:
        load_single_file(path)
    assert str(path) in str(e.value)
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1)}
    with pytest.raises(UserError, match="LoRA"):
        detect_architecture(lora)
    with pytest.raises(UserError, match="SDXL"):
        detect_architecture({"conditioner.embedders.0.transformer.x": torch.zeros(1)})


def test_damaged_checkpoint_names_what_is_missing(exported, tmp_path):
    sd, meta = read_state_dict(exported["sd1"][2])
    del sd["model.diffusion_model.output_blocks.3.0.in_layers.2.weight"]
    save_file(sd, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(UserError, match="output_blocks.3.0.in_layers.2.weight"):
        load_single_file(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_precision(exported, tmp_path, dtype):
    _, pipe, _ = exported["sd2"]
    path = save_single_file(tmp_path / "half.safetensors", pipe.unet, pipe.vae, pipe.text_encoder, "sd2",
                            dtype=dtype, metadata={"ss_note": "x"})
    tensors = load_file(str(path))
    assert {t.dtype for t in tensors.values()} == {dtype}
    _, meta = read_state_dict(path)
    assert meta["ss_note"] == "x"
    unet, *_ = load_single_file(path, dtype=None)
    assert unet.dtype == dtype
    assert pipe.unet.dtype == torch.float32  # the models passed in are not cast


def test_prediction_type_sources(exported, tmp_path):
    _, pipe, path = exported["sd1"]
    assert load_single_file(path, v_prediction=True)[-1].prediction_source == "flag"
    sd, _ = read_state_dict(path)
    bare = tmp_path / "bare.safetensors"
    save_file(sd, str(bare), metadata={"modelspec.prediction_type": "v"})
    info = load_single_file(bare)[-1]
    assert info.v_prediction and info.prediction_source == "metadata"
    save_file(sd, str(bare))
    info = load_single_file(bare)[-1]
    assert info.prediction_type == "epsilon" and info.prediction_source == "default"


def test_foreign_file_without_our_configs_builds_from_shapes(exported, tmp_path):
    """A file made elsewhere has no embedded configs: widths come from the tensors, the rest from the
    real models' rules; with the model folder as config_dir the result is exact again."""
    folder, pipe, path = exported["sd2"]
    sd, _ = read_state_dict(path)
    bare = tmp_path / "foreign.safetensors"
    save_file(sd, str(bare))
    unet, vae, text_encoder, _, _, info = load_single_file(bare)
    assert list(unet.config.block_out_channels) == [32, 32, 64, 64]
    assert unet.config.cross_attention_dim == 64 and unet.config.use_linear_projection
    assert text_encoder.config.num_hidden_layers == 4 and text_encoder.config.hidden_act == "gelu"
    unet, vae, text_encoder, *_ = load_single_file(bare, config_dir=folder)
    _assert_same_models(pipe, unet, vae, text_encoder)


@torch.no_grad()
def test_load_vae_from_every_layout(exported, tmp_path):
    folder, pipe, path = exported["sd1"]
    sd, meta = read_state_dict(path)
    vae_only = {k: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    bare = {k.removeprefix(VAE_PREFIX): v for k, v in vae_only.items()}
    save_file(bare, str(tmp_path / "bare.safetensors"), metadata=meta)
    torch.save({"state_dict": vae_only, "metadata": meta}, tmp_path / "prefixed.ckpt")
    latents = _inputs(pipe)[0]
    expected = pipe.vae.decode(latents).sample
    sources = [folder, folder / "vae", folder / "vae" / "diffusion_pytorch_model.safetensors", path,
               tmp_path / "bare.safetensors", tmp_path / "prefixed.ckpt"]
    for source in sources:
        vae = load_vae(source)
        assert_same_weights(pipe.vae, vae)
        assert_same_output(vae.decode(latents).sample, expected)
    save_file(bare, str(tmp_path / "foreign.safetensors"))  # no configs: widths from the shapes
    assert list(load_vae(tmp_path / "foreign.safetensors").config.block_out_channels) == [16, 32, 64, 64]
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="not a VAE"):
        load_vae(tmp_path / "x.safetensors")


def test_save_diffusers_folder(exported, tmp_path):
    from diffusers import StableDiffusionPipeline

    _, pipe, _ = exported["sd2"]
    out = save_diffusers(tmp_path / "model", pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                         pipe.scheduler, dtype=torch.float16)
    assert {t.dtype for t in load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")).values()} == {
        torch.float16}
    assert pipe.unet.dtype == torch.float32  # the models passed in are not cast
    loaded = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, dtype=torch.float16)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight.half())
