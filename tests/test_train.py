"""train_pfg.py through its entry points, on the tiny models and the prepared demo dataset."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_pfg
from library.errors import UserError
from library.models.pfg import PFGAdapter, PFGShape, load_pfg, pfg_metadata, save_pfg
from tests.assertions import assert_same_tensors, assert_tensors_differ
from tests.dataset_copies import one_bucket_dataset, small_dataset_copy

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def _train(model: Path, dataset: Path, out: Path, *extra: str) -> None:
    args = [
        "--pretrained_model_name_or_path", str(model), "--dataset_config", str(dataset),
        "--output_dir", str(out), "--output_name", "t", "--seed", "1",
        "--learning_rate", "1e-3", "--pfg_learning_rate", "1e-2", *extra,
    ]
    assert train_pfg.main(args) == 0


@pytest.fixture(scope="module")
def initial_pfg(tmp_path_factory) -> Path:
    """A fixed starting point (via --resume_pfg) so tests can tell what training changed."""
    torch.manual_seed(0)
    adapter = PFGAdapter(PFGShape(4, 768, 32))
    path = tmp_path_factory.mktemp("init") / "init-pfg.safetensors"
    save_pfg(adapter, path, pfg_metadata(adapter.shape, "init"))
    return path


def _unet_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.diffusion_model.")}


def test_full_mode_changes_pfg_and_unet(tiny_sd1, prepared_dataset, initial_pfg, tmp_path):
    from library.models.checkpoints import save_single_file
    from library.models.loading import load_sd_model

    _train(tiny_sd1, prepared_dataset, tmp_path, "--train_unet", "full", "--max_train_steps", "3",
           "--resume_pfg", str(initial_pfg), "--pfg_num_tokens", "4")
    trained, meta = load_pfg(tmp_path / "t-pfg.safetensors")
    start, _ = load_pfg(initial_pfg)
    weight = trained.pfg_linear.weight
    assert weight.shape == (4 * 32, 768)  # (N*C, D)
    assert not torch.equal(weight, start.pfg_linear.weight)
    assert meta["pfg.num_tokens"] == "4" and meta["pfg.encoder"].startswith("model.onnx:")
    assert meta["ss_train_unet"] == "full" and "sshs_model_hash" in meta

    base = load_sd_model(str(tiny_sd1))
    save_single_file(tmp_path / "base.safetensors", base.unet, base.vae, base.text_encoder, "sd1")
    before, after = _unet_tensors(tmp_path / "base.safetensors"), _unet_tensors(tmp_path / "t.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    reloaded = load_sd_model(str(tmp_path / "t.safetensors"))  # the saved checkpoint loads back
    assert reloaded.cross_attention_dim == 32
    assert (tmp_path / "t-settings.toml").is_file()


def test_loss_drops_on_a_repeated_batch(tiny_sd1, prepared_dataset):
    """The training step itself learns: a few optimizer steps on one batch lower its loss."""
    from library.data.dataset import PFGDataset, collate, collect_items, load_features
    from library.data.dataset_config import load_dataset_config
    from library.models.loading import load_sd_model
    from library.models.text import PromptEncoder
    from library.train.trainer import PFGTrainer, StepOptions

    torch.manual_seed(0)
    items, _ = collect_items(load_dataset_config(prepared_dataset), "illustration of *")
    features, _ = load_features(items)
    same_bucket = [i for i, item in enumerate(items) if item.assignment.bucket == items[0].assignment.bucket][:2]
    batch = collate([PFGDataset(items, features)[(i, 0)] for i in same_bucket])
    model = load_sd_model(str(tiny_sd1))
    model.vae.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    adapter = PFGAdapter(PFGShape(4, features.shape[1], 32))
    trainer = PFGTrainer(model, adapter, PromptEncoder(model.tokenizer, model.text_encoder), StepOptions())
    batch["latents"] = trainer.encode_latents(batch.pop("pixels"))
    noise = torch.randn_like(batch["latents"])
    timesteps = torch.tensor([300, 700])
    optimizer = torch.optim.AdamW(list(adapter.parameters()) + list(model.unet.parameters()), lr=1e-3)
    first = trainer.loss(batch, timesteps, noise).item()
    for _ in range(8):
        loss = trainer.loss(batch, timesteps, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert trainer.loss(batch, timesteps, noise).item() < 0.9 * first


def test_pfg_only_mode_on_sd2_keeps_the_unet(tiny_sd2, prepared_dataset, tmp_path):
    _train(tiny_sd2, prepared_dataset, tmp_path, "--train_unet", "none", "--max_train_steps", "2",
           "--pfg_num_tokens", "2", "--mixed_precision", "bf16", "--clip_skip", "2", "--max_token_length", "225")
    outputs = sorted(p.name for p in tmp_path.iterdir())
    assert outputs == ["t-pfg.safetensors", "t-settings.toml"]  # no UNet written in this mode
    adapter, meta = load_pfg(tmp_path / "t-pfg.safetensors")
    assert adapter.shape.cross_attention_dim == 64  # SD2's width, read from the UNet
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_v2"] == "True"
    assert meta["ss_max_token_length"] == "225" and meta["ss_mixed_precision"] == "bf16"


def test_resume_continues_exactly(tiny_sd1, prepared_dataset, tmp_path):
    """Straight 4 steps == 2 steps + resume + 2 steps, through a warmup that spans the resume
    point (LR 0, 1/3 | 2/3, then cosine): the LR schedule's position is restored too."""
    schedule = ["--lr_scheduler", "cosine", "--lr_warmup_steps", "3"]
    common = ["--train_unet", "full", "--pfg_num_tokens", "2", *schedule, "--max_train_steps", "4", "--save_state"]
    _train(tiny_sd1, prepared_dataset, tmp_path / "straight", *common)
    _train(tiny_sd1, prepared_dataset, tmp_path / "half", *common[:-2], "2", "--save_state")
    _train(tiny_sd1, prepared_dataset, tmp_path / "resumed", *common, "--resume", str(tmp_path / "half" / "t-state"))
    straight = load_file(str(tmp_path / "straight" / "t-pfg.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "t-pfg.safetensors"))
    half = load_file(str(tmp_path / "half" / "t-pfg.safetensors"))
    assert_same_tensors(straight, resumed)
    assert_tensors_differ(straight, half)
    assert_same_tensors(_unet_tensors(tmp_path / "straight" / "t.safetensors"), _unet_tensors(tmp_path / "resumed" / "t.safetensors"))
    # a state of another mode is refused with the folder named, not a traceback
    with pytest.raises(UserError, match=r"--resume .*t-state: this state does not fit the current run"):
        _train(tiny_sd1, prepared_dataset, tmp_path / "other", "--train_unet", "lora", "--pfg_num_tokens", "2",
               "--max_train_steps", "4", "--resume", str(tmp_path / "half" / "t-state"))


def test_intermediate_saves_rotate(tiny_sd1, prepared_dataset, tmp_path):
    _train(tiny_sd1, prepared_dataset, tmp_path, "--train_unet", "none", "--max_train_steps", "6",
           "--pfg_num_tokens", "2", "--save_every_n_steps", "2", "--save_last_n", "1", "--save_pfg_pt", "--save_precision", "fp16")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["t-pfg.pt", "t-pfg.safetensors", "t-settings.toml", "t-step00000004-pfg.pt", "t-step00000004-pfg.safetensors"]
    # the .pt is fp32 whatever --save_precision says: the original loaders crash on half-precision weights
    pt, safetensors = torch.load(tmp_path / "t-pfg.pt", weights_only=True), load_file(str(tmp_path / "t-pfg.safetensors"))
    assert pt.keys() == safetensors.keys() and {v.dtype for v in pt.values()} == {torch.float32}
    assert {v.dtype for v in safetensors.values()} == {torch.float16}
    assert all(torch.equal(pt[k].half(), safetensors[k]) for k in pt)


def test_config_file_supplies_flags_and_unknown_keys_suggest(tiny_sd1, prepared_dataset, tmp_path):
    good = tmp_path / "train.toml"
    good.write_text(
        f'[model]\npretrained_model_name_or_path = "{tiny_sd1.as_posix()}"\ndataset_config = "{prepared_dataset.as_posix()}"\n'
        f'output_dir = "{(tmp_path / "out").as_posix()}"\n[training]\ntrain_unet = "none"\nmax_train_steps = 1\npfg_num_tokens = 1\n'
    )
    assert train_pfg.main(["--config_file", str(good), "--output_name", "cli"]) == 0
    assert (tmp_path / "out" / "cli-pfg.safetensors").is_file()  # the command line wins over the file

    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rat = 1e-4\n")
    with pytest.raises(UserError, match=r"bad\.toml: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        train_pfg.main(["--config_file", str(bad)])
    wrong_type = tmp_path / "type.toml"
    wrong_type.write_text('max_train_steps = "many"\n')
    with pytest.raises(UserError, match="max_train_steps' must be int"):
        train_pfg.main(["--config_file", str(wrong_type)])


def test_dataset_errors_come_before_any_model_loads(tmp_path):
    toml = tmp_path / "data.toml"
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "nowhere"\nnum_repeat = 2\n')
    # the model path does not exist either: the dataset problem must be reported first
    with pytest.raises(UserError) as info:
        train_pfg.main(["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--dataset_config", str(toml)])
    assert "data.toml" in str(info.value) and "num_repeat" in str(info.value)


@pytest.mark.parametrize("where", ["here", "another process"])
def test_divergence_stops_with_a_message(tiny_sd1, prepared_dataset, tmp_path, monkeypatch, where):
    """A NaN loss stops the run; the check shares every process's loss (accelerate's gather), so
    a NaN on another DDP process stops this one too instead of leaving it waiting. The last
    good save point stays; nothing half-trained is written as final."""
    from accelerate import Accelerator

    gathered = []
    real_gather = Accelerator.gather

    def gather(self, tensor):
        out = real_gather(self, tensor)
        if tensor.shape != (1, 2):  # not the per-batch (loss, signal) share: a save point's agreement
            return out
        gathered.append(tensor.shape)
        if where == "another process" and len(gathered) >= 2:  # step 2: the other process diverged
            out = torch.cat([out, out.new_tensor([[float("nan"), 0.0]])])  # its (loss, signal) row
        return out

    monkeypatch.setattr(Accelerator, "gather", gather)
    flags = {"here": ["--optimizer_type", "torch.optim.SGD", "--learning_rate", "1e30", "--max_grad_norm", "0"],
             "another process": ["--save_every_n_steps", "1"]}[where]
    message = "loss became" if where == "here" else r"loss became nan on process 1 at step 2 \(epoch 1\)"
    with pytest.raises(UserError, match=message):
        _train(tiny_sd1, prepared_dataset, tmp_path, "--train_unet", "full", "--max_train_steps", "5", "--pfg_num_tokens", "1", *flags)
    assert gathered and gathered[0] == (1, 2)  # every step's loss (and signal) went through the shared check
    assert not (tmp_path / "t-pfg.safetensors").exists()
    if where == "another process":
        assert (tmp_path / "t-step00000001-pfg.safetensors").is_file() and (tmp_path / "t-step00000001.safetensors").is_file()


def test_accelerate_launch_entry_point(tiny_sd1, prepared_dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "train_pfg.py",
        "--pretrained_model_name_or_path", str(tiny_sd1), "--dataset_config", str(prepared_dataset),
        "--output_dir", str(tmp_path), "--output_name", "launched", "--train_unet", "none",
        "--max_train_steps", "1", "--pfg_num_tokens", "1",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "launched-pfg.safetensors").is_file()


def test_bad_flags_print_one_line_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "train_pfg.py", "--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path / "none")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "error:" in result.stderr and "none" in result.stderr


def _state_progress(state: Path) -> dict:
    return json.loads((state / "train_state.json").read_text())


def test_accumulation_ends_each_epoch_with_an_optimizer_step(tiny_sd1, prepared_dataset, tmp_path):
    """3 batches per epoch, --gradient_accumulation_steps 2: an epoch is 2 optimizer steps (the last
    group holds one batch), --max_train_epochs 2 is exactly 4 steps, an epoch save falls on a step
    (nothing half-accumulated), and resuming from it equals the straight run, schedule included."""
    dataset = one_bucket_dataset(prepared_dataset, tmp_path / "data", 6, batch_size=2)
    common = ["--train_unet", "full", "--pfg_num_tokens", "2", "--optimizer_type", "AdamW", "--gradient_accumulation_steps", "2",
              "--max_train_epochs", "2", "--lr_scheduler", "linear", "--save_state"]
    _train(tiny_sd1, dataset, tmp_path / "straight", *common, "--save_every_n_epochs", "1")
    epoch_save = tmp_path / "straight" / "t-000001-state"
    assert _state_progress(epoch_save) == {"epoch": 1, "global_step": 2, "batch_in_epoch": 0}
    assert _state_progress(tmp_path / "straight" / "t-state") == {"epoch": 1, "global_step": 4, "batch_in_epoch": 3}
    meta = load_pfg(tmp_path / "straight" / "t-pfg.safetensors")[1]
    assert meta["ss_max_train_steps"] == "4" and meta["ss_num_epochs"] == "2" and meta["ss_num_batches_per_epoch"] == "3"
    # linear decay from 1e-2 (the PFG head's rate) over 4 steps: 3/4 of it after step... 2 of 4 is half
    lr_after_epoch = torch.load(epoch_save / "scheduler.bin", weights_only=True)["_last_lr"]
    assert lr_after_epoch == pytest.approx([1e-2 * 2 / 4, 1e-3 * 2 / 4])

    _train(tiny_sd1, dataset, tmp_path / "resumed", *common, "--resume", str(epoch_save))
    assert _state_progress(tmp_path / "resumed" / "t-state") == _state_progress(tmp_path / "straight" / "t-state")
    for name in ("t-pfg.safetensors", "t.safetensors"):
        assert_same_tensors(load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name)))


def test_accumulation_equals_a_k_times_larger_batch(tiny_sd1, prepared_dataset, tmp_path, monkeypatch):
    """k batches of 1 accumulated make the same optimizer steps as batches of k, the epoch's short
    last group included (its loss is the mean of the batches in it, as a short batch's is). The
    samples are copies of one image with the noise, timestep and latents pinned, so only the
    grouping differs; plain SGD without clipping shows any difference in gradient scale."""
    from library.train.trainer import PFGTrainer

    real_loss = PFGTrainer.loss
    fixed = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))

    def pinned(self, batch, timesteps=None, noise=None):
        count = batch["latents"].shape[0]
        batch = {**batch, "latents": fixed.expand(count, -1, -1, -1)}
        return real_loss(self, batch, torch.full((count,), 500), (0.5 * fixed).expand(count, -1, -1, -1))

    monkeypatch.setattr(PFGTrainer, "loss", pinned)
    common = ["--train_unet", "none", "--pfg_num_tokens", "2", "--optimizer_type", "torch.optim.SGD", "--pfg_learning_rate", "0.5",
              "--max_grad_norm", "0", "--max_train_steps", "4", "--cache_latents"]
    for name, batch_size, k in (("accumulated", 1, "2"), ("batched", 2, "1")):
        dataset = one_bucket_dataset(prepared_dataset, tmp_path / f"data-{name}", 3, batch_size=batch_size, same_image=True)
        _train(tiny_sd1, dataset, tmp_path / name, *common, "--gradient_accumulation_steps", k, "--save_state")
        assert _state_progress(tmp_path / name / "t-state") == {"epoch": 1, "global_step": 4, "batch_in_epoch": -(-3 // batch_size)}
    accumulated, batched = (load_file(str(tmp_path / name / "t-pfg.safetensors")) for name in ("accumulated", "batched"))
    assert accumulated.keys() == batched.keys()
    for key in accumulated:
        torch.testing.assert_close(accumulated[key], batched[key], rtol=1e-4, atol=1e-6)


def test_samples_and_tensorboard_during_training(tiny_sd1, prepared_dataset, tiny_tagger, demo_dataset, tmp_path):
    prompts = tmp_path / "prompts.txt"
    guide = demo_dataset / "images" / "ruby_00.png"
    prompts.write_text(f"# comment\nillustration of * --i {guide}:1.0 --w 64 --h 64 --s 2 --d 7\nillustration of * --s 2 --d 8 --w 32 --h 64\n")
    torch.manual_seed(123)
    _train(tiny_sd1, prepared_dataset, tmp_path / "with", "--train_unet", "none", "--max_train_steps", "2", "--pfg_num_tokens", "2",
           "--sample_prompts", str(prompts), "--sample_every_n_steps", "1", "--tagger_model", str(tiny_tagger),
           "--logging_dir", str(tmp_path / "logs"))
    samples = sorted(p.name for p in (tmp_path / "with" / "sample").iterdir())
    assert samples == ["t_000001_00_7.png", "t_000001_01_8.png", "t_000002_00_7.png", "t_000002_01_8.png"]
    assert any((tmp_path / "logs").rglob("events.out.tfevents*"))
    # sampling restores the random state: the trained weights equal a run without samples
    _train(tiny_sd1, prepared_dataset, tmp_path / "without", "--train_unet", "none", "--max_train_steps", "2", "--pfg_num_tokens", "2")
    a = load_file(str(tmp_path / "with" / "t-pfg.safetensors"))
    b = load_file(str(tmp_path / "without" / "t-pfg.safetensors"))
    assert_same_tensors(a, b)


def test_sample_prompt_errors_come_first(tmp_path, prepared_dataset):
    prompts = tmp_path / "p.txt"
    prompts.write_text("illustration of * --w 65\n")
    with pytest.raises(UserError, match=r"p\.txt:1: .*multiples of 8"):
        train_pfg.main(["--pretrained_model_name_or_path", "missing", "--dataset_config", str(prepared_dataset),
                        "--sample_prompts", str(prompts), "--sample_every_n_steps", "1"])


def test_validation_split_logs_loss_and_conditioning_gain(tiny_sd1, prepared_dataset, tmp_path, capsys):
    _train(tiny_sd1, prepared_dataset, tmp_path, "--train_unet", "none", "--max_train_steps", "2", "--pfg_num_tokens", "2",
           "--validation_split", "0.2", "--validation_every_n_steps", "1", "--validation_timesteps", "2", "--validation_candidates", "3",
           "--pfg_hidden_dim", "8", "--pfg_dropout", "0.5", "--noise_offset", "0.05", "--min_snr_gamma", "5",
           "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--gradient_checkpointing")
    out = capsys.readouterr().out
    assert "29 images" in out and "7 held out for validation" in out
    lines = [line for line in out.splitlines() if line.startswith("validation @ step")]
    assert [line.split(":")[0] for line in lines] == ["validation @ step 1", "validation @ step 2"]
    assert "conditioning gain" in lines[0] and "retrieval" in lines[0]
    _, meta = load_pfg(tmp_path / "t-pfg.safetensors")
    assert meta["pfg.head"] == "mlp" and meta["ss_num_train_images"] == "29"


def test_two_process_ddp_on_cpu(tiny_sd1, prepared_dataset, tmp_path):
    """Multi-process data parallel (gloo on CPU): batches are split, outputs written once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_pfg.py",
        "--pretrained_model_name_or_path", str(tiny_sd1), "--dataset_config", str(prepared_dataset),
        "--output_dir", str(tmp_path), "--output_name", "ddp", "--train_unet", "full",
        "--max_train_steps", "2", "--pfg_num_tokens", "1", "--save_state", "--validation_split", "0.2",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    assert result.stdout.count("validation @ step 2") == 1  # the main process alone validates and prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp-pfg.safetensors", "ddp-settings.toml", "ddp-state", "ddp.safetensors"]


def test_stale_or_foreign_feature_caches_are_never_used_silently(tiny_sd1, prepared_dataset, tiny_tagger, tmp_path):
    """An image edited after prepare_features.py, or caches of another encoder than the subset
    pins, stop training with the file named; with --tagger_model the trainer recomputes them."""
    from library.data.features import feature_cache_path, read_cache

    toml = small_dataset_copy(prepared_dataset, tmp_path, 4)
    edited = sorted((tmp_path / "images").glob("*.png"))[0]
    os.utime(edited, (edited.stat().st_atime, edited.stat().st_mtime + 60))

    flags = ["--train_unet", "none", "--max_train_steps", "1"]
    with pytest.raises(UserError, match=r"1 feature caches were made from another version of their image") as info:
        _train(tiny_sd1, toml, tmp_path / "out", *flags)
    assert edited.name in str(info.value)

    _train(tiny_sd1, toml, tmp_path / "out", *flags, "--tagger_model", str(tiny_tagger))
    assert read_cache(feature_cache_path(edited, None), edited)[2]  # recomputed: current again

    toml.write_text(toml.read_text() + 'encoder = "wd-some-other-tagger"\n')
    with pytest.raises(UserError, match=r"pins encoder = 'wd-some-other-tagger'"):
        _train(tiny_sd1, toml, tmp_path / "out2", *flags)


@pytest.mark.parametrize("flags, message", [
    (["--optimizer_type", "AdamW9bit"], r"--optimizer_type 'AdamW9bit' is unknown \(did you mean AdamW8bit\?\)"),
    (["--optimizer_type", "torch.optim.NoSuchOptimizer"], r"--optimizer_type torch.optim.NoSuchOptimizer: module 'torch.optim' has no 'NoSuchOptimizer'"),
    (["--optimizer_type", "no_such_package.Opt"], r"--optimizer_type no_such_package.Opt: cannot import module 'no_such_package'"),
    (["--optimizer_type", "torch.nn.Linear"], r"--optimizer_type torch.nn.Linear: .* is not a torch.optim.Optimizer class"),
    (["--optimizer_args", "weight_decay"], r"--optimizer_args 'weight_decay': expected key=value"),
    (["--optimizer_args", "betas=(0.9,"], r"--optimizer_args 'betas=\(0.9,': cannot read the value '\(0.9,'"),
    (["--optimizer_type", "AdamW", "--optimizer_args", "weight_decy=0.1"],
     r"--optimizer_args: AdamW has no argument 'weight_decy' \(did you mean 'weight_decay'\?\)"),
    (["--resume", "{tmp}/missing-state"], r"--resume .*missing-state: no such folder"),
    (["--resume", "{tmp}"], r"--resume .*: not a training state folder \(no train_state.json"),
])
def test_optimizer_and_resume_errors_come_before_any_model_loads(tmp_path, flags, message):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    # neither the model nor the dataset exists: the flag's problem must be reported first
    with pytest.raises(UserError, match=message):
        train_pfg.main(["--pretrained_model_name_or_path", str(tmp_path / "no-model"),
                        "--dataset_config", str(tmp_path / "no-data.toml"), *flags])


@pytest.mark.parametrize("optimizer, args", [
    ("Lion", ["weight_decay=0.01"]), ("Lion8bit", []), ("Prodigy", ["d_coef=0.5"]), ("Adafactor", []),
])
def test_each_named_optimizer_trains(tiny_sd1, prepared_dataset, initial_pfg, tmp_path, optimizer, args):
    _train(tiny_sd1, prepared_dataset, tmp_path, "--train_unet", "none", "--max_train_steps", "2", "--pfg_num_tokens", "4",
           "--resume_pfg", str(initial_pfg), "--optimizer_type", optimizer, *(["--optimizer_args", *args] if args else []))
    trained, meta = load_pfg(tmp_path / "t-pfg.safetensors")
    start, _ = load_pfg(initial_pfg)
    assert meta["ss_optimizer"] == optimizer
    assert torch.isfinite(trained.pfg_linear.weight).all()
    assert not torch.equal(trained.pfg_linear.weight, start.pfg_linear.weight)


@pytest.mark.parametrize("case", ["sd2 diffusers", "sd1 fp16 ckpt per epoch"])
def test_full_mode_outputs(request, prepared_dataset, tmp_path, case):
    """Full mode in each output format and precision: SD2 with bf16 autocast into a diffusers
    folder; SD1 with fp16 autocast into .ckpt files, saved every epoch."""
    from library.models.loading import load_sd_model

    if case == "sd2 diffusers":
        model = request.getfixturevalue("tiny_sd2")
        # bf16 full training with buckets at least 64 px wide: at 32 px the latent reaches the UNet's
        # last downsampler (a stride-2 3x3 conv) 1 pixel wide, where PyTorch's CPU (oneDNN) bf16
        # weight gradient reads uninitialised memory (torch 2.13) and the loss turned NaN by chance
        # (what the process allocated before decided it). train_pfg.py warns of such runs:
        # test_cpu_bf16_warns_of_buckets_that_meet_the_onednn_conv_gradient_bug.
        wide = tmp_path / "wide.toml"
        wide.write_text(prepared_dataset.read_text().replace("min_bucket_reso = 32", "min_bucket_reso = 64"))
        _train(model, wide, tmp_path / "out", "--train_unet", "full", "--max_train_steps", "2", "--pfg_num_tokens", "2",
               "--save_model_as", "diffusers", "--mixed_precision", "bf16")
        tmp_path = tmp_path / "out"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "t-pfg.safetensors", "t-settings.toml"]
        saved = load_sd_model(str(tmp_path / "t"))
        assert saved.variant == "sd2" and saved.v_prediction and saved.cross_attention_dim == 64
        meta = load_pfg(tmp_path / "t-pfg.safetensors")[1]
        assert meta["ss_mixed_precision"] == "bf16" and "64x64" in meta["ss_bucket_info"] and "32x96" not in meta["ss_bucket_info"]
        final = [tmp_path / "t"]
    else:
        model = request.getfixturevalue("tiny_sd1")
        data = small_dataset_copy(prepared_dataset, tmp_path / "data", 4)
        _train(model, data, tmp_path / "out", "--train_unet", "full", "--max_train_epochs", "2", "--save_every_n_epochs", "1",
               "--pfg_num_tokens", "2", "--mixed_precision", "fp16", "--save_model_as", "ckpt")
        names = sorted(p.name for p in (tmp_path / "out").iterdir())
        assert names == ["t-000001-pfg.safetensors", "t-000001.ckpt", "t-pfg.safetensors", "t-settings.toml", "t.ckpt"]
        meta = load_pfg(tmp_path / "out" / "t-000001-pfg.safetensors")[1]
        assert meta["ss_mixed_precision"] == "fp16" and meta["ss_epoch"] == "1"
        final = [tmp_path / "out" / "t-000001.ckpt", tmp_path / "out" / "t.ckpt"]
    base = load_sd_model(str(model))
    for path in final:  # each save point loads back, and training changed its UNet
        unet = load_sd_model(str(path)).unet
        assert unet.state_dict().keys() == base.unet.state_dict().keys()
        assert any(not torch.equal(a, b) for a, b in zip(unet.state_dict().values(), base.unet.state_dict().values()))


def test_cpu_bf16_warns_of_buckets_that_meet_the_onednn_conv_gradient_bug(tiny_sd2):
    """On the CPU, oneDNN's bf16 weight gradient of a stride-2 conv over a 1-pixel-wide input is
    garbage (NaN when the memory it reads held NaNs): SD's last downsampler sees one from buckets
    32 px wide or narrower. Training its weights in bf16 on such buckets says so."""
    from library.cli_config import parse_settings
    from library.models.loading import load_sd_model
    from library.train.settings import TrainSettings
    from library.train.setup import cpu_bf16_conv_warning

    model = load_sd_model(str(tiny_sd2))
    cpu = torch.device("cpu")

    def warning(*extra, buckets=((32, 96), (64, 64)), device=cpu):
        settings, _ = parse_settings(TrainSettings, ["--pretrained_model_name_or_path", str(tiny_sd2), "--train_data_dir", "x", *extra], "")
        return cpu_bf16_conv_warning(settings, model, buckets, device)

    message = warning("--train_unet", "full", "--mixed_precision", "bf16")
    assert "buckets 32 px wide or narrower (here 32x96)" in message and "--mixed_precision no" in message
    assert warning("--train_unet", "full", "--mixed_precision", "bf16", "--full_bf16") == message
    assert warning("--train_unet", "lora", "--network_conv_dim", "2", "--mixed_precision", "bf16") == message
    # no weight gradient of a downsampler, no narrow bucket, not bf16, or not the CPU: nothing to say
    assert warning("--train_unet", "lora", "--mixed_precision", "bf16") is None
    assert warning("--train_unet", "none", "--mixed_precision", "bf16") is None
    assert warning("--train_unet", "full", "--mixed_precision", "bf16", buckets=((64, 64), (96, 32))) is None
    assert warning("--train_unet", "full") is None and warning("--train_unet", "full", "--mixed_precision", "fp16") is None
    assert warning("--train_unet", "full", "--mixed_precision", "bf16", device=torch.device("cuda")) is None


def test_sharded_training_refuses_what_it_cannot_do(prepared_dataset, tmp_path, monkeypatch):
    """Under FSDP or ZeRO-3 the main process cannot run the model alone (each holds a shard):
    --sample_prompts / --validation_split are refused before any model loads (the model path here
    does not exist). ZeRO-2 keeps whole weights everywhere, so they stay allowed. LoRA under FSDP1
    needs use_orig_params. accelerate only shards on GPUs, so its state is stood in for."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from library.cli_config import parse_settings
    from library.train.settings import TrainSettings
    from library.train.setup import check_sharding

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("illustration of * --s 2\n")
    args = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--dataset_config", str(prepared_dataset),
            "--output_dir", str(tmp_path / "out"), "--sample_prompts", str(prompts), "--sample_every_n_steps", "5",
            "--validation_split", "0.2"]
    message = "--sample_prompts and --validation_split run the model on the main process alone, which {} (weights sharded"
    with monkeypatch.context() as fsdp:
        fsdp.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
        with pytest.raises(UserError, match=re.escape(message.format("FSDP"))):
            train_pfg.main(args)

    settings, _ = parse_settings(TrainSettings, args, "")
    for stage in (3, 2):
        deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
        if stage == 3:
            with pytest.raises(UserError, match=re.escape(message.format("DeepSpeed ZeRO-3"))):
                check_sharding(deepspeed, settings)
        else:
            check_sharding(deepspeed, settings)
    with pytest.raises(UserError, match="no-model"):  # DDP: on to loading the (missing) model
        train_pfg.main(args)

    # FSDP1 flattens the weights into one all-trainable or all-frozen tensor unless use_orig_params:
    # a LoRA beside the frozen UNet needs it; FSDP2 keeps the parameters as they are
    lora, _ = parse_settings(TrainSettings, args[:6] + ["--train_unet", "lora"], "")
    for version, orig, refused in ((1, False, True), (1, True, False), (2, None, False)):
        fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP,
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version, use_orig_params=orig)))
        if refused:
            with pytest.raises(UserError, match="FSDP1 allows only with use_orig_params: set fsdp_use_orig_params: true"):
                check_sharding(fsdp, lora)
        else:
            check_sharding(fsdp, lora)


def test_one_module_is_prepared_and_saved_under_its_own_names(tiny_sd1, prepared_dataset, tmp_path, monkeypatch):
    """accelerate.prepare gets one model (DeepSpeed accepts only one): the PFG head and the UNet
    in one TrainedModules. Saving goes through accelerate's get_state_dict (the gathered full
    weights under FSDP/ZeRO-3); the files keep their own key names, no wrapper prefix."""
    from accelerate import Accelerator

    from library.train.setup import TrainedModules

    prepared, gathered = [], []
    real_prepare, real_get_state_dict = Accelerator.prepare, Accelerator.get_state_dict

    def prepare(self, *args, **kwargs):
        prepared.append(args)
        return real_prepare(self, *args, **kwargs)

    def get_state_dict(self, model, unwrap=True):
        state = real_get_state_dict(self, model, unwrap)
        gathered.append(sorted({k.split(".")[0] for k in state}))
        return {k: v.detach().clone() for k, v in state.items()}  # a copy, as FSDP's gather gives

    monkeypatch.setattr(Accelerator, "prepare", prepare)
    monkeypatch.setattr(Accelerator, "get_state_dict", get_state_dict)
    _train(tiny_sd1, prepared_dataset, tmp_path, "--train_unet", "lora", "--max_train_steps", "2", "--pfg_num_tokens", "2",
           "--network_dim", "2", "--network_alpha", "1")
    modules = [a for a in prepared[0] if isinstance(a, torch.nn.Module)]
    assert len(prepared) == 1 and len(modules) == 1 and isinstance(modules[0], TrainedModules)
    assert gathered == [["adapter", "unet"]]
    assert set(load_file(str(tmp_path / "t-pfg.safetensors"))) == {"pfg_linear.weight", "pfg_linear.bias"}
    lora = load_file(str(tmp_path / "t-lora.safetensors"))
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in lora.items())  # trained: up starts at zero
