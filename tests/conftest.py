"""Session-scoped fixtures: the tiny models and the demo dataset are built once per test run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def kit_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kit")


@pytest.fixture(scope="session")
def tiny_sd1(kit_dir) -> Path:
    """Tiny SD1.x-layout diffusers folder (epsilon prediction)."""
    from tools.make_tiny_sd import build_tiny_sd

    return build_tiny_sd(kit_dir / "tiny-sd1", variant="sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2(kit_dir) -> Path:
    """Tiny SD2.x-like diffusers folder (v-prediction, wider cross-attention, "!" padding)."""
    from tools.make_tiny_sd import build_tiny_sd

    return build_tiny_sd(kit_dir / "tiny-sd2", variant="sd2", seed=0)


@pytest.fixture(scope="session")
def tiny_tagger(kit_dir) -> Path:
    """Tiny WD-style ViT tagger folder: model.onnx (NHWC, input_1:0, 448) + selected_tags.csv."""
    from tools.make_tiny_tagger import build_tiny_tagger

    return build_tiny_tagger(kit_dir / "tiny-tagger", seed=0)


@pytest.fixture(scope="session")
def tiny_tagger_nchw(kit_dir) -> Path:
    """Another tiny tagger: NCHW input, D=1024."""
    from tools.make_tiny_tagger import build_tiny_tagger

    return build_tiny_tagger(kit_dir / "tiny-tagger-nchw", seed=1, family="nchw-1024")


@pytest.fixture(scope="session")
def demo_dataset(kit_dir) -> Path:
    """Synthetic character images (some with .txt captions) in the demo layout."""
    from tools.make_demo_dataset import build_demo_dataset

    return build_demo_dataset(kit_dir / "demo-data", seed=0)


@pytest.fixture(scope="session")
def prepared_dataset(kit_dir, demo_dataset, tiny_tagger) -> Path:
    """The demo images with their `_pfg.npz` vectors (made by prepare_features.py), and a
    dataset TOML for them: returns the TOML path. Tests must not modify these files."""
    import prepare_features

    image_dir = demo_dataset / "images"
    toml_path = kit_dir / "prepared_dataset.toml"
    toml_path.write_text(
        "[general]\nresolution = 64\nbatch_size = 2\nenable_bucket = true\nmin_bucket_reso = 32\n"
        "max_bucket_reso = 128\nbucket_reso_steps = 32\ncaption_extension = \".txt\"\n\n"
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"{image_dir.as_posix()}\"\nnum_repeats = 1\n"
    )
    assert prepare_features.main(["--dataset_config", str(toml_path), "--tagger_model", str(tiny_tagger)]) in (0, None)
    return toml_path


@pytest.fixture(scope="session")
def tiny_sdxl(kit_dir) -> Path:
    """Tiny SDXL-layout diffusers folder (text_time conditioning, two text encoders and tokenizers)."""
    from tools.make_tiny_sd import build_tiny_sd

    return build_tiny_sd(kit_dir / "tiny-sdxl", variant="sdxl", seed=0)


class NetworkAttempted(BaseException):
    """Raised by `network_blocked`: a BaseException, so no `except Exception`/`except OSError` in
    the code under test can swallow the attempt and carry on."""


@pytest.fixture
def network_blocked(monkeypatch):
    """Sockets and the hub's download functions record any use and raise NetworkAttempted; the test
    then also fails at teardown if anything tried, even where the code under test caught it."""
    import socket

    import huggingface_hub

    attempts: list[str] = []

    def blocker(name):
        def blocked(*args, **kwargs):
            attempts.append(name)
            raise NetworkAttempted(f"network access in an offline test: {name}")
        return blocked

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, blocker(f"socket.{name}"))
    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, blocker(name))
    for name in ("hf_hub_download", "snapshot_download", "model_info"):
        monkeypatch.setattr(huggingface_hub, name, blocker(f"huggingface_hub.{name}"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield attempts
    assert attempts == [], f"the code under test tried the network: {attempts}"


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process training run builds its own Accelerator (with its own precision); accelerate
    keeps one state per process, so it is reset around each test that trains in-process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def tiny_clip(kit_dir) -> Path:
    """Tiny CLIP vision folder (transformers' CLIPVisionModelWithProjection, random weights)."""
    from tools.make_tiny_clip_vision import build_tiny_clip_vision

    return build_tiny_clip_vision(kit_dir / "tiny-clip-vision", seed=0)
