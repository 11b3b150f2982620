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
def demo_dataset(kit_dir) -> Path:
    """Synthetic character images (some with .txt captions) in the demo layout."""
    from tools.make_demo_dataset import build_demo_dataset

    return build_demo_dataset(kit_dir / "demo-data", seed=0)
