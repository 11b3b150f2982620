"""Self-describing outputs: ss_* training keys, modelspec.*, the webui hashes, and the
`python -m library.metadata` inspector."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import train_pfg

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def outputs(tiny_sd1, prepared_dataset, tmp_path_factory) -> Path:
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("meta")
    for mode in ("full", "lora"):
        AcceleratorState._reset_state(True)
        assert train_pfg.main([
            "--pretrained_model_name_or_path", str(tiny_sd1), "--dataset_config", str(prepared_dataset),
            "--output_dir", str(out), "--output_name", mode, "--train_unet", mode, "--max_train_steps", "1",
            "--pfg_num_tokens", "2", "--network_dim", "2", "--save_precision", "fp16",
        ]) == 0
    AcceleratorState._reset_state(True)
    return out


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _tensor_bytes_hash(path: Path) -> str:
    """What webui extensions compute: sha256 of everything after the safetensors header."""
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header :]).hexdigest()


@pytest.mark.parametrize("name", ["full-pfg.safetensors", "lora-pfg.safetensors", "lora-lora.safetensors", "full.safetensors"])
def test_every_output_describes_itself(outputs, name):
    meta = _metadata(outputs / name)
    for key in ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
                "modelspec.resolution", "modelspec.prediction_type", "ss_learning_rate", "ss_max_train_steps",
                "ss_base_model_version", "ss_seed"):
        assert key in meta, key
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-v1")
    assert json.loads(meta["ss_bucket_info"]) and json.loads(meta["ss_dataset_dirs"])  # JSON values parse
    float(meta["ss_learning_rate"]), int(meta["ss_max_train_steps"])


@pytest.mark.parametrize("name", ["full-pfg.safetensors", "lora-lora.safetensors", "full.safetensors"])
def test_precomputed_hashes_match_the_file(outputs, name):
    meta = _metadata(outputs / name)
    assert meta["sshs_model_hash"] == _tensor_bytes_hash(outputs / name)
    assert len(meta["sshs_legacy_hash"]) == 8


def test_architecture_names_the_adapter_kind(outputs):
    assert _metadata(outputs / "full-pfg.safetensors")["modelspec.architecture"].endswith("/pfg")
    assert _metadata(outputs / "lora-lora.safetensors")["modelspec.architecture"].endswith("/lora")


def test_inspector_prints_metadata_and_tensors(outputs):
    result = subprocess.run([sys.executable, "-m", "library.metadata", str(outputs / "full-pfg.safetensors")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pfg.num_tokens: 2" in result.stdout and "sshs_model_hash:" in result.stdout
    assert "pfg_linear.weight: [64, 768] F16" in result.stdout


def test_inspector_rejects_other_files_cleanly(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("hello")
    result = subprocess.run([sys.executable, "-m", "library.metadata", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "notes.safetensors" in result.stderr and "Traceback" not in result.stderr
