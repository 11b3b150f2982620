"""Each training flag proven by what it does: through train_pfg.py, recording what the training
step receives and computes, and against the flag's formula where it is one. A flag merely echoed
into the metadata would fail these."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import train_pfg
from library.errors import UserError
from library.models.loading import load_sd_model
from library.models.pfg import PFGAdapter, PFGShape
from library.train.trainer import PFGTrainer, StepOptions
from tests.dataset_copies import one_bucket_dataset

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def _train(model: Path, dataset: Path, out: Path, *extra: str) -> None:
    args = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(dataset), "--output_dir", str(out),
            "--output_name", "t", "--seed", "1", "--pfg_num_tokens", "2", *extra]
    assert train_pfg.main(args) == 0


@pytest.fixture
def recorded(monkeypatch):
    """What the step saw, call by call: the options, the captions and their text states, the PFG
    tokens next to the head's own output, the UNet context, the trained parameters' dtypes and the
    attention processors in use."""
    calls: dict[str, list] = {"tokens": [], "text": [], "context": [], "options": [], "dtypes": [], "processors": []}
    real_tokens, real_text, real_unet = PFGTrainer.pfg_tokens, PFGTrainer.encode_text, PFGTrainer.call_unet

    def pfg_tokens(self, features, text_states, drop=None):
        tokens = real_tokens(self, features, text_states, drop)
        with torch.no_grad():
            calls["tokens"].append((tokens.detach().clone(), self.adapter(features).detach().clone(), text_states.detach().clone()))
        calls["options"].append(self.options)
        calls["dtypes"].append({p.dtype for m in (self.adapter, self.model.unet) for p in m.parameters() if p.requires_grad})
        calls["processors"].append({type(p).__name__ for p in self.model.unet.attn_processors.values()})
        return tokens

    def encode_text(self, captions):
        states, pooled = real_text(self, captions)
        calls["text"].append((list(captions), states.detach().clone()))
        return states, pooled

    def call_unet(self, noisy, timesteps, text_states, tokens, added=None):
        calls["context"].append(text_states.shape[1] + tokens.shape[1])
        return real_unet(self, noisy, timesteps, text_states, tokens, added)

    monkeypatch.setattr(PFGTrainer, "pfg_tokens", pfg_tokens)
    monkeypatch.setattr(PFGTrainer, "encode_text", encode_text)
    monkeypatch.setattr(PFGTrainer, "call_unet", call_unet)
    return calls


def test_pfg_dropout_pads_that_fraction_of_samples_with_exactly_the_padding(tiny_sd1, prepared_dataset, tmp_path, recorded):
    """--pfg_dropout 0.25 --uncond eos over 240 samples: a sample's PFG tokens are either exactly
    the head's tokens or exactly the padding (the last text state, repeated), and the padded share
    is 0.25 within four binomial standard deviations. The other step flags reach the step too."""
    p = 0.25
    dataset = one_bucket_dataset(prepared_dataset, tmp_path / "data", 24, batch_size=24)
    _train(tiny_sd1, dataset, tmp_path / "out", "--train_unet", "none", "--max_train_steps", "10", "--cache_latents",
           "--pfg_dropout", str(p), "--uncond", "eos", "--noise_offset", "0.05", "--min_snr_gamma", "5")
    padded = kept = 0
    for tokens, own, text_states in recorded["tokens"]:
        padding = text_states[:, -1:, :].expand_as(tokens)
        for i in range(tokens.shape[0]):
            if torch.equal(tokens[i], padding[i]):
                padded += 1
            else:
                assert torch.equal(tokens[i], own[i])
                kept += 1
    n = padded + kept
    assert n == 240
    assert abs(padded / n - p) <= 4 * (p * (1 - p) / n) ** 0.5, padded
    assert set(recorded["options"]) == {StepOptions(noise_offset=0.05, min_snr_gamma=5.0, pfg_dropout=p, uncond="eos")}


@pytest.fixture(scope="module")
def steps(tiny_sd1, tiny_sd2):
    """A PFG step per tiny model (SD1: epsilon, SD2: v-prediction) and a fixed batch for it."""
    made = {}
    for name, folder in (("sd1", tiny_sd1), ("sd2", tiny_sd2)):
        model = load_sd_model(str(folder))
        for module in (model.unet, model.vae, model.text_encoder):
            module.requires_grad_(False)
        torch.manual_seed(0)
        adapter = PFGAdapter(PFGShape(2, 16, model.cross_attention_dim))
        batch = {"latents": torch.randn(4, 4, 8, 8), "features": torch.randn(4, 16), "captions": ["a cat"] * 4}
        made[name] = (model, adapter, model.prompt_encoder(), batch)
    return made


def _noisy_input(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = PFGTrainer.call_unet

    def call_unet(self, noisy, timesteps, text_states, tokens, added=None):
        seen.append(noisy.detach().clone())
        return real(self, noisy, timesteps, text_states, tokens, added)

    monkeypatch.setattr(PFGTrainer, "call_unet", call_unet)
    return seen


@pytest.mark.parametrize("offset", [0.0, 0.1])
def test_noise_offset_adds_a_per_sample_per_channel_constant(steps, monkeypatch, offset):
    """noise = ε + offset·δ, δ one normal draw per sample and channel; 0 (the default) draws none."""
    model, adapter, prompts, batch = steps["sd1"]
    seen = _noisy_input(monkeypatch)
    trainer = PFGTrainer(model, adapter, prompts, StepOptions(noise_offset=offset))
    t = torch.tensor([10, 300, 600, 990])
    with torch.no_grad():
        torch.manual_seed(3)
        trainer.loss(batch, timesteps=t)
        next_draw = torch.randn(1)
    latents = batch["latents"]
    torch.manual_seed(3)
    noise = torch.randn_like(latents)
    if offset:
        noise = noise + offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1)
    assert torch.equal(seen[0], trainer.noise_scheduler.add_noise(latents, noise, t))
    assert torch.equal(next_draw, torch.randn(1))  # and nothing else was drawn


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_min_snr_gamma_weighs_each_sample_by_its_formula(steps, family):
    """Min-SNR-γ: loss = mean_i w(t_i)·mse_i with w = min(SNR, γ)/SNR for epsilon prediction and
    min(SNR, γ)/(SNR + 1) for v-prediction (SD2 here); γ = 0 is the plain mean of the MSEs."""
    model, adapter, prompts, batch = steps[family]
    assert model.v_prediction == (family == "sd2")
    t = torch.tensor([10, 300, 600, 990])
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1))
    plain = PFGTrainer(model, adapter, prompts, StepOptions())
    with torch.no_grad():
        per_sample = torch.stack([
            plain.loss({k: v[i : i + 1] for k, v in batch.items()}, timesteps=t[i : i + 1], noise=noise[i : i + 1]) for i in range(4)
        ])
        weighted = PFGTrainer(model, adapter, prompts, StepOptions(min_snr_gamma=5.0)).loss(batch, timesteps=t, noise=noise)
        unweighted = plain.loss(batch, timesteps=t, noise=noise)
    alphas = plain.noise_scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=5.0) / (snr + 1 if model.v_prediction else snr)
    assert weights.min() < 0.9  # the test timesteps reach where the weighting bites
    torch.testing.assert_close(weighted, (weights * per_sample).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(unweighted, per_sample.mean(), rtol=1e-5, atol=0)


def test_full_bf16_trains_bf16_weights_with_bf16_optimizer_state(tiny_sd1, prepared_dataset, tmp_path, recorded):
    dataset = one_bucket_dataset(prepared_dataset, tmp_path / "data", 4, batch_size=2)
    _train(tiny_sd1, dataset, tmp_path / "out", "--train_unet", "full", "--max_train_steps", "2", "--mixed_precision", "bf16",
           "--full_bf16", "--optimizer_type", "AdamW", "--save_state")
    assert recorded["dtypes"] and all(dtypes == {torch.bfloat16} for dtypes in recorded["dtypes"])
    state = tmp_path / "out" / "t-state"
    weights = load_file(str(state / "model.safetensors"))
    assert weights and {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    optimizer = torch.load(state / "optimizer.bin", weights_only=True)["state"]
    assert optimizer and {s["exp_avg"].dtype for s in optimizer.values()} == {torch.bfloat16}
    with pytest.raises(UserError, match="--full_bf16 needs --mixed_precision bf16"):
        _train(tiny_sd1, dataset, tmp_path / "refused", "--full_bf16", "--mixed_precision", "fp16")


def _expected_states(model, caption: str, clip_skip: int, chunks: int) -> torch.Tensor:
    """The states kohya conditions on, computed from the Hugging Face tokenizers and encoders
    directly: each 77-token chunk (the caption, then empty ones) through the text encoder; SD1/SD2
    take layer -k through the final layer norm, SDXL the penultimate layer (or -k for k > 2) of both
    encoders, unnormalised, side by side."""
    def ids(tokenizer):
        rows = [tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
                for text in [caption] + [""] * (chunks - 1)]
        return torch.tensor(rows)

    with torch.no_grad():
        if model.is_sdxl:
            layer = -max(2, clip_skip)
            first = model.text_encoder(input_ids=ids(model.tokenizer), output_hidden_states=True).hidden_states[layer]
            second = model.text_encoder_2(input_ids=ids(model.tokenizer_2), output_hidden_states=True).hidden_states[layer]
            states = torch.cat([first, second], dim=-1)
        else:
            out = model.text_encoder(input_ids=ids(model.tokenizer), output_hidden_states=True)
            norm = getattr(model.text_encoder, "text_model", model.text_encoder).final_layer_norm
            states = out.last_hidden_state if clip_skip == 1 else norm(out.hidden_states[-clip_skip])
    return states.reshape(1, chunks * 77, -1)[0]


@pytest.mark.parametrize("family,clip_skip,max_token_length", [("sd1", 2, 150), ("sd2", 3, 225), ("sdxl", 2, 150)])
def test_clip_skip_and_max_token_length_shape_the_text_states(request, family, clip_skip, max_token_length, prepared_dataset,
                                                              tmp_path, recorded):
    """--clip_skip k: the states of layer -k (kohya's convention per family); --max_token_length
    150|225: the UNet gets 2|3 chunks of 77 states, then the PFG tokens."""
    folder = request.getfixturevalue(f"tiny_{family}")
    dataset = one_bucket_dataset(prepared_dataset, tmp_path / "data", 2, batch_size=2)
    _train(folder, dataset, tmp_path / "out", "--train_unet", "none", "--max_train_steps", "1", "--clip_skip", str(clip_skip),
           "--max_token_length", str(max_token_length), "--pfg_prompt", "a cat sitting")
    chunks = max_token_length // 75
    assert recorded["context"] == [chunks * 77 + 2]
    model = load_sd_model(str(folder))
    captions, states = recorded["text"][0]
    for caption, got in zip(captions, states):
        torch.testing.assert_close(got, _expected_states(model, caption, clip_skip, chunks), rtol=1e-5, atol=1e-6)
    if family == "sd1":  # and layer -k is not the last layer: the flag changed something
        assert not torch.allclose(states[0], _expected_states(model, captions[0], 1, chunks), atol=1e-4)


def test_optimizer_args_and_attention_backend_reach_the_run(tiny_sd1, prepared_dataset, tmp_path, recorded):
    """--optimizer_args values are the optimizer's, in every param group; --sdpa puts torch's SDPA
    processor on every attention layer; --xformers without CUDA is a clear error."""
    dataset = one_bucket_dataset(prepared_dataset, tmp_path / "data", 2, batch_size=2)
    _train(tiny_sd1, dataset, tmp_path / "out", "--train_unet", "full", "--max_train_steps", "1", "--sdpa", "--save_state",
           "--optimizer_type", "AdamW", "--optimizer_args", "weight_decay=0.123", "betas=(0.8,0.95)", "eps=1e-7")
    groups = torch.load(tmp_path / "out" / "t-state" / "optimizer.bin", weights_only=True)["param_groups"]
    assert [g["name"] for g in groups] == ["pfg", "full"]
    assert all(g["weight_decay"] == 0.123 and tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-7 for g in groups)
    assert recorded["processors"] == [{"AttnProcessor2_0"}]
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--xformers needs a CUDA GPU"):
            _train(tiny_sd1, dataset, tmp_path / "xformers", "--max_train_steps", "1", "--xformers")


def test_deepspeed_auto_values_are_filled_in_accelerates_own_plugin():
    """Where the DeepSpeed config says "auto", the dataset's batch size and --max_grad_norm fill it
    (accelerate's DeepSpeedPlugin, which builds without a GPU or deepspeed); set values are kept."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from library.train.setup import fill_deepspeed_config

    def accelerator(config):
        plugin = DeepSpeedPlugin(hf_ds_config=config)
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin)), plugin

    auto, plugin = accelerator({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 2}})
    fill_deepspeed_config(auto, 6, 0.5)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 6 and plugin.deepspeed_config["gradient_clipping"] == 0.5
    fixed, plugin = accelerator({"train_micro_batch_size_per_gpu": 3, "gradient_clipping": 2.0, "zero_optimization": {"stage": 2}})
    fill_deepspeed_config(fixed, 6, 0.5)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3 and plugin.deepspeed_config["gradient_clipping"] == 2.0
