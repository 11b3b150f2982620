"""train_pfg.py on two processes: DDP over torch.distributed (gloo on CPU), launched by torchrun
as `accelerate launch --multi_gpu` launches it on GPUs, with accelerate's MULTI_CPU state.

Each launch pays two interpreter starts and imports (about 10 s), so the tests are few."""
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

from library.models.pfg import load_pfg
from tests.assertions import assert_same_tensors
from tests.dataset_copies import small_dataset_copy

REPO = Path(__file__).resolve().parent.parent


def _launch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_pfg.py", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _common(model: Path, dataset: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(dataset), "--output_dir", str(out),
            "--output_name", "t", "--seed", "1", "--learning_rate", "1e-3", "--pfg_learning_rate", "1e-2",
            "--train_unet", "full", "--pfg_num_tokens", "2", "--optimizer_type", "AdamW"]


WARMUP, STEPS, LEARNING_RATES = 2, 4, (1e-2, 1e-3)  # the PFG head's rate, the UNet's (see _common)


def _single_process_rates(step: int) -> list[float]:
    """The learning rates after `step` optimizer steps of one process: diffusers' own schedule,
    as train_pfg.py builds it, stepped once per step."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": lr} for lr in LEARNING_RATES])
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    for _ in range(step):
        optimizer.step()
        schedule.step()
    return schedule.get_last_lr()


def _state_rates(state: Path) -> list[float]:
    return torch.load(state / "scheduler.bin", weights_only=True)["_last_lr"]


def test_two_processes_train_resume_exactly_and_save_once(tiny_sd1, prepared_dataset, tmp_path):
    """Two processes split each epoch's batches; 4 steps straight equal 2 steps + resume + 2 steps
    (each process's data share, noise stream and optimizer state come back), with the outputs
    written once by the main process and the metadata telling the process count. The processes
    share the latent caching: each encodes its half to disk, then all read every cache.

    The learning rate after every step, straight and resumed, is the single-process schedule's
    (warmup then cosine): accelerate would have stepped it once per process. And with
    --gradient_accumulation_steps 3 over 2 batches per process and epoch, each epoch's short group
    is an optimizer step of its own: one step per epoch, and the resume point an epoch boundary."""
    dataset = small_dataset_copy(prepared_dataset, tmp_path / "data", 12)
    schedule = ["--lr_scheduler", "cosine", "--lr_warmup_steps", str(WARMUP), "--max_train_steps", str(STEPS),
                "--gradient_accumulation_steps", "3",
                "--validation_split", "0.2", "--validation_every_n_steps", "2", "--cache_latents_to_disk"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("illustration of * --w 64 --h 64 --s 2 --d 7\n")
    straight = _launch(*_common(tiny_sd1, dataset, tmp_path / "straight"), *schedule,
                       "--save_every_n_steps", "1", "--save_state", "--sample_prompts", str(prompts), "--sample_every_n_steps", "3")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "training 'full' on 2 process(es): 4 steps, 10 images, 4 epochs" in straight.stdout
    # 10 training images in 5 batches of 2: each process takes 2, and the output says where the fifth went
    assert "each epoch leaves out 1 of its batches (a different draw each epoch), so that the 2 processes take equal shares" in straight.stdout
    # samples and validation run on the main process while the other waits, and leave no trace
    # in the training (the resumed run below has no samples)
    assert sorted(p.name for p in (tmp_path / "straight" / "sample").iterdir()) == ["t_000003_00_7.png"]
    assert straight.stdout.count("conditioning gain") >= 2
    states = [tmp_path / "straight" / f"t-step{step:08d}-state" for step in range(1, STEPS)] + [tmp_path / "straight" / "t-state"]
    for step, state in enumerate(states, start=1):
        assert _state_rates(state) == pytest.approx(_single_process_rates(step), rel=1e-12, abs=0), step
        assert json.loads((state / "train_state.json").read_text()) == {"epoch": step - 1, "global_step": step, "batch_in_epoch": 2}
    state = states[1]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in state.iterdir()}  # one noise stream each

    trained_images = int(re.search(r"(\d+) images, PFG vectors", straight.stdout).group(1))
    caches = sorted((tmp_path / "data" / "images").glob("*_sd.npz"))
    assert len(caches) == trained_images == 10  # 12 images, 2 held out for validation: one cache each
    stamps = {p: p.stat().st_mtime_ns for p in caches}
    encoded = re.findall(r"caching latents: 100%\|[^|]*\| (\d+)/\d+", straight.stderr)  # the main process's bar
    assert encoded == ["5"], encoded  # its half; the other half came from the other process

    resumed = _launch(*_common(tiny_sd1, dataset, tmp_path / "resumed"), *schedule, "--resume", str(state), "--save_state")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 2" in resumed.stdout
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["t-pfg.safetensors", "t-settings.toml", "t-state", "t.safetensors"]
    assert _state_rates(tmp_path / "resumed" / "t-state") == pytest.approx(_single_process_rates(STEPS), rel=1e-12, abs=0)
    for name in ("t-pfg.safetensors", "t.safetensors"):
        assert_same_tensors(load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name)))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data" / "images").glob("*_sd.npz")} == stamps  # read, not redone
    meta = load_pfg(tmp_path / "resumed" / "t-pfg.safetensors")[1]
    assert meta["ss_num_processes"] == "2" and meta["ss_batch_size_per_device"] == "2"


def test_a_failure_in_one_share_stops_every_process(tiny_sd1, prepared_dataset, tiny_tagger, tmp_path):
    """--tagger_model encodes missing vectors, each process its share of the images. An image that
    cannot be decoded falls to process 1; process 0 must stop too, not wait for it forever."""
    dataset = small_dataset_copy(prepared_dataset, tmp_path / "data", 3)
    good = sorted((tmp_path / "data" / "images").glob("*.png"))[0]
    (good.parent / "zz_truncated.png").write_bytes(good.read_bytes()[:200])  # sorted 4th: process 1's share
    result = _launch(*_common(tiny_sd1, dataset, tmp_path / "out"), "--max_train_steps", "2", "--tagger_model", str(tiny_tagger))
    assert "failed: " in result.stdout and "zz_truncated.png: corrupt or truncated image" in result.stdout
    message = "error: some images could not be encoded (listed above by process 1); fix or remove them, then train again"
    assert result.stderr.count(message) == 2  # each process says it, and each ends with status 2
    assert "exitcode  : 2" in result.stderr and "SIGABRT" not in result.stderr
    assert not (tmp_path / "out" / "t-pfg.safetensors").exists()
