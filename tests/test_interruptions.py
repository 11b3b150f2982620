"""Never lose a run: kill -9 at any moment, SIGTERM/SIGINT, a full or read-only disk, a process
of a two-process run that dies. Training and preparation run as subprocesses (the way a job
scheduler runs them); every interrupted run is resumed with `--resume latest` and must end with
exactly the weights of the run that was never interrupted."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import train_pfg
from library.data.features import read_cache
from library.errors import UserError
from library.train.state import (
    clean_interrupted_saves,
    is_complete,
    latest_state,
    resolve_resume,
)
from tests.assertions import assert_same_tensors
from tests.dataset_copies import one_bucket_dataset

REPO = Path(__file__).resolve().parent.parent
STEPS = 6
OUTPUTS = ("t-pfg.safetensors", "t.safetensors")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _command(model: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "train_pfg.py", "--pretrained_model_name_or_path", str(model), "--dataset_config", str(dataset),
            "--output_dir", str(out), "--output_name", "t", "--seed", "1", "--train_unet", "full", "--pfg_num_tokens", "2",
            "--optimizer_type", "AdamW", "--max_train_steps", str(STEPS), *extra]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_kit(tmp_path_factory, tiny_sd1, prepared_dataset):
    """A 6-image, 3-batch dataset and the outputs of the run that is never interrupted."""
    root = tmp_path_factory.mktemp("interruptions")
    dataset = one_bucket_dataset(prepared_dataset, root / "data", 6, batch_size=2)
    straight = _run(_command(tiny_sd1, dataset, root / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    return {"model": tiny_sd1, "dataset": dataset, "straight": {name: load_file(str(root / "straight" / name)) for name in OUTPUTS}}


def _assert_everything_usable(out: Path) -> None:
    """What a kill left: every visible file loads, every visible state folder is complete; hidden
    temporary files are the next run's to clean."""
    for path in out.iterdir():
        if path.name.startswith("."):
            continue
        if path.suffix == ".safetensors":
            assert load_file(str(path)), path
        elif path.name.endswith("-state"):
            assert is_complete(path), path


def _resume_to_the_end(kit, out: Path) -> None:
    resume = ["--resume", "latest"] if latest_state(out, "t") is not None else []
    result = _run(_command(kit["model"], kit["dataset"], out, "--save_every_n_steps", "1", "--save_state", *resume))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "leftovers of the interrupted save remain"
    for name in OUTPUTS:
        assert_same_tensors(kit["straight"][name], load_file(str(out / name)))


def _pid_of_rank(out: Path, rank: int) -> int:
    """The process of `rank` among the training processes writing to `out` (torchrun's workers)."""
    for pid in map(int, subprocess.run(["pgrep", "-f", "--", f"--output_dir {out}"], capture_output=True, text=True).stdout.split()):
        try:
            environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if environ.get("RANK") == str(rank):
            return pid
    raise AssertionError(f"no process of rank {rank} writes to {out}")


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("moment", ["inside a state save", "random 1", "random 2"])
def test_kill_9_at_any_moment_then_resume_latest_gives_the_uninterrupted_run(run_kit, tmp_path, moment):
    """kill -9 mid-run (inside a save: when its hidden temporary state folder appears; else at a
    seeded random moment of the run): the folder holds only complete files and states, and
    `--resume latest` (from scratch if no state was complete yet) ends with the uninterrupted
    run's weights, bit for bit."""
    out = tmp_path / "out"
    process = _start(_command(run_kit["model"], run_kit["dataset"], out, "--save_every_n_steps", "1", "--save_state"),
                     tmp_path / "killed.log")
    if moment == "inside a state save":
        hit = _wait_for(lambda: out.is_dir() and any(p.name.endswith("-state.tmp") for p in out.iterdir()), process)
        assert hit, (tmp_path / "killed.log").read_text()[-2000:]
    else:
        started = _wait_for(lambda: "training 'full'" in (tmp_path / "killed.log").read_text(), process)
        assert started, (tmp_path / "killed.log").read_text()[-2000:]
        time.sleep(random.Random(moment).uniform(0.0, 4.0))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    _assert_everything_usable(out)
    _resume_to_the_end(run_kit, out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_resumable_state_without_periodic_saves(run_kit, tmp_path, signum):
    """SIGTERM (preemption) or SIGINT (Ctrl-C): the step finishes, a NAME-stepNNNNNNNN-state and the
    outputs are written, the resume command is printed and the exit status is 143 / 130; the
    state resumes to the uninterrupted run's weights."""
    out, log = tmp_path / "out", tmp_path / "signal.log"
    process = _start(_command(run_kit["model"], run_kit["dataset"], out, "--save_on_signal_timeout", "90"), log)
    assert _wait_for(lambda: re.search(r"steps: .*\| [1-4]/6", log.read_text()) is not None, process), log.read_text()[-2000:]
    process.send_signal(signum)
    assert process.wait(timeout=300) == 128 + signum, log.read_text()[-3000:]
    text = log.read_text()
    name = signal.Signals(signum).name
    assert f"{name} received: finishing this optimizer step" in text and "within the grace period of 90 s" in text
    saved = re.search(rf"stopped by {name} after saving (\S+t-step(\d{{8}})-state)", text)
    assert saved, text[-2000:]
    state, step = Path(saved.group(1)), int(saved.group(2))
    assert is_complete(state) and 1 <= step < STEPS
    assert (out / f"t-step{step:08d}-pfg.safetensors").is_file() and (out / f"t-step{step:08d}.safetensors").is_file()
    command = re.search(r"to continue: (.*)", text).group(1)
    assert command.endswith(f"--resume {state}") and "train_pfg.py" in command
    result = _run(_command(run_kit["model"], run_kit["dataset"], out, "--resume", "latest"))
    assert result.returncode == 0 and f"resuming from {state}" in result.stdout, result.stderr[-2000:]
    for output in OUTPUTS:
        assert_same_tensors(run_kit["straight"][output], load_file(str(out / output)))


def test_a_second_signal_stops_at_once_and_leaves_nothing_partial(run_kit, tmp_path):
    out, log = tmp_path / "out", tmp_path / "twice.log"
    process = _start(_command(run_kit["model"], run_kit["dataset"], out), log)
    assert _wait_for(lambda: re.search(r"steps: .*\| [1-4]/6", log.read_text()) is not None, process), log.read_text()[-2000:]
    process.send_signal(signal.SIGTERM)
    assert _wait_for(lambda: "SIGTERM received" in log.read_text(), process), log.read_text()[-2000:]
    process.send_signal(signal.SIGTERM)  # while the step finishes or the save runs
    assert process.wait(timeout=300) == 143, log.read_text()[-3000:]
    assert "stopped at once by a second SIGTERM" in log.read_text()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    _assert_everything_usable(out)


def test_prepare_features_killed_then_rerun_encodes_each_image_once(tiny_tagger, tmp_path):
    """kill -9 of prepare_features.py mid-run: every cache on disk is readable; the rerun keeps
    them (not rewritten) and encodes exactly the images without one."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    command = [sys.executable, "prepare_features.py", "--train_data_dir", str(images), "--tagger_model", str(tiny_tagger),
               "--batch_size", "4", "--num_workers", "1"]
    process = _start(command, tmp_path / "prepare.log")
    assert _wait_for(lambda: len(list(images.glob("*_pfg.npz"))) >= 40, process), (tmp_path / "prepare.log").read_text()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    caches = {p: p.stat().st_mtime_ns for p in images.glob("*_pfg.npz")}
    assert 40 <= len(caches) < 400
    for cache in caches:
        vector, encoder, current = read_cache(cache, images / cache.name.replace("_pfg.npz", ".png"))
        assert current and encoder and vector.shape[0] > 0
    rerun = _run(command)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"400 images, {len(caches)} with a valid cache, {400 - len(caches)} to encode" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in caches} == caches  # kept, not recomputed
    assert len(list(images.glob("*_pfg.npz"))) == 400


def test_resume_latest_takes_the_newest_complete_state_and_says_when_there_is_none(run_kit, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"--resume latest: .* holds no complete training state of 't'"):
        resolve_resume("latest", out, "t")
    result = _run(_command(run_kit["model"], run_kit["dataset"], out, "--max_train_steps", "3", "--save_every_n_steps", "1",
                           "--save_state"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert resolve_resume("latest", out, "t") == out / "t-state"  # step 3, the end
    (out / "t-state" / "optimizer.bin").unlink()  # an incomplete state is never resumed from
    assert resolve_resume("latest", out, "t") == out / "t-step00000002-state"
    with pytest.raises(UserError, match=r"t-state: the state is incomplete \(no optimizer state\)"):
        resolve_resume(str(out / "t-state"), out, "t")
    # a replacement interrupted between its two renames: the hidden previous copy comes back
    os.replace(out / "t-step00000002-state", out / ".t-step00000002-state.old")
    (out / ".t-pfg.abc.tmp.safetensors").write_bytes(b"partial")
    done = clean_interrupted_saves(out, "t")
    assert any("restored t-step00000002-state" in line for line in done) and (out / "t-step00000002-state").is_dir()
    assert not (out / ".t-pfg.abc.tmp.safetensors").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB file system (tmpfs, when this test runs as root): room for the PFG head and a
    state of the tiny model's head, not for a full single-file checkpoint. None where it cannot
    be mounted: the tests then inject ENOSPC into the writers instead."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _inject_enospc(monkeypatch, after_bytes: int) -> None:
    """Where no small file system can be mounted: writes through safetensors fail like a full disk."""
    import errno

    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if sum(t.numel() * t.element_size() for t in tensors.values()) > after_bytes:
            Path(filename).write_bytes(b"\0" * 1024)  # what a writer leaves before the disk refuses
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_a_full_disk_stops_with_the_path_and_free_space_or_goes_on_when_asked(run_kit, tmp_path, small_disk, monkeypatch,
                                                                           capsys, fresh_accelerate_state):
    """The PFG head fits, the full checkpoint does not. By default the first refused save stops
    the run with one line naming the file and the free space, no partial file left; with
    --continue_on_save_error periodic saves are skipped with a warning (the earlier files
    intact) and the final one still fails clearly."""
    out = small_disk if small_disk is not None else tmp_path / "out"
    if small_disk is None:
        _inject_enospc(monkeypatch, after_bytes=4 << 20)
    args = ["--pretrained_model_name_or_path", str(run_kit["model"]), "--dataset_config", str(run_kit["dataset"]),
            "--output_dir", str(out), "--output_name", "t", "--train_unet", "full", "--pfg_num_tokens", "2",
            "--max_train_steps", "3", "--save_every_n_steps", "1"]
    with pytest.raises(UserError, match=r"cannot write \S+t-step00000001\.safetensors: No space left on device \(.* free on .*\); "
                                         r"training stopped at step 1"):
        train_pfg.main(args)
    assert sorted(p.name for p in out.iterdir()) == ["t-settings.toml", "t-step00000001-pfg.safetensors"]
    assert load_file(str(out / "t-step00000001-pfg.safetensors"))

    with pytest.raises(UserError, match=r"cannot write \S+/t\.safetensors: No space left on device"):
        train_pfg.main([*args, "--continue_on_save_error"])
    assert capsys.readouterr().out.count("training goes on (--continue_on_save_error)") == 2
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    for path in out.glob("*.safetensors"):
        assert load_file(str(path))


def test_a_full_disk_during_cache_writes_stops_prepare_with_one_line(tiny_tagger, tmp_path, small_disk, capsys, monkeypatch):
    """prepare_features.py writing caches onto a full disk: one message naming the cache and the
    free space (not a failure line per image), and the caches written before are complete."""
    import prepare_features

    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):
        Image.fromarray(np.full((24, 32, 3), i * 5, np.uint8)).save(images / f"{i:03d}.png")
    caches = small_disk if small_disk is not None else tmp_path / "caches"
    if small_disk is not None:
        filler = caches / "filler.bin"  # leave room for a handful of caches only
        filler.write_bytes(b"\0" * ((12 << 20) - (64 << 10)))
    else:
        import errno

        import numpy

        real, written = numpy.savez, []

        def savez(file, **arrays):
            if len(written) >= 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written.append(file)
            return real(file, **arrays)

        monkeypatch.setattr(numpy, "savez", savez)
    with pytest.raises(UserError, match=r"cannot write \S+_pfg\.npz: No space left on device \(.* free on .*\)"):
        prepare_features.main(["--train_data_dir", str(images), "--tagger_model", str(tiny_tagger), "--cache_dir", str(caches),
                               "--batch_size", "4", "--num_workers", "1"])
    assert "failed:" not in capsys.readouterr().out
    written = sorted(caches.glob("*_pfg.npz"))
    assert 0 < len(written) < 40 and not [p for p in caches.iterdir() if p.name.startswith(".")]
    for cache in written:
        assert read_cache(cache)[0].shape[0] > 0


def test_a_read_only_output_folder_is_said_before_training_ends_badly(run_kit, tmp_path, fresh_accelerate_state):
    """A read-only output folder is said before any model loads, not a traceback after the training."""
    out = tmp_path / "ro"
    out.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(out)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        out.chmod(0o555)
    try:
        if not mounted and os.access(out, os.W_OK):
            pytest.skip("this user can write into a read-only folder (root without mount)")
        with pytest.raises(UserError, match=r"--output_dir \S+ro: cannot write there: (Read-only file system|Permission denied|the folder is not writable)"):
            train_pfg.main(["--pretrained_model_name_or_path", str(run_kit["model"]), "--dataset_config", str(run_kit["dataset"]),
                            "--output_dir", str(out), "--output_name", "t", "--train_unet", "none", "--pfg_num_tokens", "2",
                            "--max_train_steps", "1"])
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(out)], capture_output=True)
        else:
            out.chmod(0o755)


def test_a_process_killed_under_ddp_ends_the_run_with_a_message(run_kit, tmp_path):
    """Two processes; process 1 is killed -9 (as an out-of-memory kill would): process 0's next
    collective fails, it stops with a message instead of waiting, and the launcher names the
    process that died. The whole run ends within seconds, far inside --ddp_timeout."""
    env = {**_env(), "ACCELERATE_USE_CPU": "true"}
    out, log = tmp_path / "out", tmp_path / "ddp.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *_command(run_kit["model"], run_kit["dataset"], out, "--ddp_timeout", "2", "--train_unet", "none")[1:]]
    command[command.index("--max_train_steps") + 1] = "400"
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    assert _wait_for(lambda: re.search(r"steps: .*\| \d+/400", log.read_text()) is not None, process), log.read_text()[-2000:]
    rank_1 = _pid_of_rank(out, 1)
    killed_at = time.monotonic()
    os.kill(rank_1, signal.SIGKILL)
    assert process.wait(timeout=150) != 0
    assert time.monotonic() - killed_at < 60
    text = log.read_text()
    assert "error: process 0 lost the others at step" in text and "rerun with --resume latest" in text
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", text), text[-3000:]


def test_a_full_disk_during_a_state_save_keeps_the_previous_state(run_kit, tmp_path, monkeypatch, fresh_accelerate_state):
    """accelerate's save_state refused by the disk at step 2 (injected: it writes part of a file,
    then ENOSPC): the error names the state folder and the free space, the step-1 state is intact
    and still the newest complete one, and no partial folder is left."""
    import errno

    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"cannot write \S+\.t-step00000002-state\.tmp: No space left on device \(.* free on .*\); "
                                         r"training stopped at step 2; the newest complete state is \S+t-step00000001-state"):
        train_pfg.main(["--pretrained_model_name_or_path", str(run_kit["model"]), "--dataset_config", str(run_kit["dataset"]),
                        "--output_dir", str(out), "--output_name", "t", "--train_unet", "none", "--pfg_num_tokens", "2",
                        "--max_train_steps", "4", "--save_every_n_steps", "1", "--save_state"])
    assert is_complete(out / "t-step00000001-state") and latest_state(out, "t") == out / "t-step00000001-state"
    assert not (out / "t-step00000002-state").exists() and not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_under_ddp_a_signal_to_one_process_stops_both_after_the_same_step(run_kit, tmp_path):
    """SIGTERM reaches process 1 only: the request travels with the next loss share, both
    processes stop after the same step and write one complete state (both random states), and
    resuming it on two processes ends with the weights of the two-process run never stopped."""
    env = {**_env(), "ACCELERATE_USE_CPU": "true"}

    def launch(out: Path, *extra: str) -> list[str]:
        command = _command(run_kit["model"], run_kit["dataset"], out, "--train_unet", "lora", "--network_dim", "2", *extra)
        command[command.index("--max_train_steps") + 1] = "12"
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command[1:]]

    straight = subprocess.run(launch(tmp_path / "straight"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out, log = tmp_path / "out", tmp_path / "ddp-signal.log"
    process = subprocess.Popen(launch(out), cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    assert _wait_for(lambda: re.search(r"steps: .*\| [1-6]/12", log.read_text()) is not None, process), log.read_text()[-2000:]
    os.kill(_pid_of_rank(out, 1), signal.SIGTERM)
    process.wait(timeout=300)
    text = log.read_text()
    saved = re.search(r"stopped by SIGTERM after saving (\S+t-step(\d{8})-state)", text)
    assert saved, text[-3000:]
    state = Path(saved.group(1))
    assert is_complete(state) and {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in state.iterdir()}
    assert "exitcode  : 143" in text  # a signal's stop, not a crash (the launcher then ends the other process)
    resumed = subprocess.run(launch(out, "--resume", "latest"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and f"resuming from {state}" in resumed.stdout, resumed.stderr[-3000:]
    for name in ("t-pfg.safetensors", "t-lora.safetensors"):
        assert_same_tensors(load_file(str(tmp_path / "straight" / name)), load_file(str(out / name)))
