"""Saving in bounded memory: the streaming safetensors writer (the same files and sshs hashes as
before, one tensor in memory at a time) and what a save killed mid-write leaves behind."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save as save_to_bytes, save_file

from library.fileio import remove_stale_temporaries
from library.metadata import safetensors_hashes
from library.tensor_files import write_safetensors

REPO = Path(__file__).resolve().parent.parent


def old_safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """The implementation before the streaming writer (kohya's precalculate_safetensors_hashes):
    the whole file serialised in memory with its ss_* keys, then hashed."""
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = io.BytesIO(save_to_bytes({k: v.contiguous() for k, v in tensors.items()}, training_only))
    header_len = int.from_bytes(data.read(8), "little")
    data.seek(8 + header_len)
    model_hash = hashlib.sha256(data.read()).hexdigest()
    data.seek(0x100000)
    legacy_hash = hashlib.sha256(data.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8 : 8 + length])


@pytest.mark.parametrize("size", [5, 400_000], ids=["under 1 MiB", "over 1 MiB"])
def test_files_and_hashes_equal_the_old_implementation(tmp_path, size):
    """Mixed dtypes (safetensors stores the larger first), odd shapes, metadata that JSON escapes:
    the streamed file holds safetensors' own header and data, and its sshs_* hashes are the old
    implementation's, both for files whose 1 MiB legacy window lies in the data and for shorter ones."""
    torch.manual_seed(0)
    tensors = {"b.weight": torch.randn(size), "a.x": torch.randn(7, 3).half(), "steps": torch.arange(5),
               "m": torch.randn(2, 2).bfloat16(), "flag": torch.tensor(True), "empty": torch.zeros(0, 3)}
    meta = {"ss_note": 'é\n"q\u0001/', "modelspec.title": "t", "ss_steps": "2"}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, tensors, meta)
    save_file(tensors, str(theirs), metadata=meta)
    (length, header), (their_length, their_header) = _header(ours), _header(theirs)
    assert (length, header) == (their_length, their_header)
    assert ours.read_bytes()[8 + length :] == theirs.read_bytes()[8 + length :]
    for keys in (meta, {}, {"ss_other": "x" * 5000}):
        assert safetensors_hashes(tensors, keys) == old_safetensors_hashes(tensors, keys)

    write_safetensors(ours, tensors, meta, dtype=torch.float16, hashes=True)
    with safe_open(str(ours), framework="pt") as f:
        stored = f.metadata()
    cast = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    assert (stored["sshs_model_hash"], stored["sshs_legacy_hash"]) == old_safetensors_hashes(cast, meta)
    assert {k: v for k, v in stored.items() if not k.startswith("sshs_")} == meta
    loaded = load_file(str(ours))
    assert loaded.keys() == cast.keys() and all(torch.equal(loaded[k], cast[k]) for k in cast)
    # what webui extensions compute from the file itself
    assert stored["sshs_model_hash"] == hashlib.sha256(ours.read_bytes()[8 + _header(ours)[0] :]).hexdigest()


def test_saving_holds_one_tensor_at_a_time(tmp_path):
    """256 MB of fp32 weights saved as fp16 with hashes: the process's peak memory grows by about
    one cast tensor (8 MB here), where the old path held the cast copy (128 MB) and two serialised
    copies. glibc's threshold for giving freed blocks back adapts upwards and would keep some as
    slack; a fixed threshold shows what the writer itself holds."""
    script = (
        "import resource, sys, torch\n"
        "from library.tensor_files import write_safetensors\n"
        "tensors = {f'layer{i}.weight': torch.randn(4096, 1024) for i in range(16)}\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "write_safetensors(sys.argv[1], tensors, {'ss_x': '1'}, dtype=torch.float16, hashes=True)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w.safetensors")], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert result.returncode == 0, result.stderr[-2000:]
    grown_mb = int(result.stdout.strip())
    assert grown_mb < 24, f"saving grew the peak by {grown_mb} MB"
    assert (tmp_path / "w.safetensors").stat().st_size > 128 * 2**20


def test_a_save_killed_mid_write_leaves_nothing_once_the_next_run_starts(tmp_path):
    """kill -9 during a save (what the out-of-memory killer does): the output never appears half
    written, and the temporary file the dead process could not remove goes when the next run's
    OutputWriter starts. Temporaries of live processes are left alone."""
    from library.train.saving import OutputSettings, OutputWriter

    script = (
        "import sys, time, torch\n"
        "import library.tensor_files as tf\n"
        "real = tf._tensor_bytes\n"
        "def slow(tensor, dtype):\n"
        "    print('writing', flush=True); time.sleep(60); return real(tensor, dtype)\n"
        "tf._tensor_bytes = slow\n"
        "tf.write_safetensors(sys.argv[1], {'w': torch.zeros(1000)}, {'ss_x': '1'}, hashes=True)\n"
    )
    target = tmp_path / "out" / "t.safetensors"
    child = subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    left = [p for p in target.parent.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".t.") and ".tmp" in left[0].name and not target.exists()
    alive = target.parent / f".u.{left[0].name.split('.')[2].split('~')[0]}~{os.getpid()}.abcdefgh.tmp.safetensors"
    alive.write_bytes(b"")  # a save in progress in this (live) process

    OutputWriter(OutputSettings(target.parent, "t", "none", "safetensors", "float", False, 0), None, {}, "enc", (64, 64))
    assert [p.name for p in target.parent.iterdir()] == [alive.name]
    assert remove_stale_temporaries(target.parent) == []
