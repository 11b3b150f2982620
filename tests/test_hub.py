"""library/models/hub.py turns only the hub's and the network's errors into user messages: a bug
inside a download (here a TypeError) surfaces as itself, not as "the hub cannot be reached"."""
from __future__ import annotations

import huggingface_hub
import pytest
from huggingface_hub import errors

from library.errors import UserError
from library.models.hub import download_clip, download_pipeline, download_tagger


def _raise(error):
    def fail(*args, **kwargs):
        raise error
    return fail


def test_a_bug_in_the_pipeline_download_is_not_called_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "model_info", _raise(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        download_pipeline("someone/model")


def test_no_connection_falls_back_to_the_cache_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub, "model_info", _raise(ConnectionError("no route to host")))
    with pytest.raises(UserError, match=r"nor in the local Hugging Face cache, and the hub cannot be reached \(ConnectionError: no route"):
        download_pipeline("someone/model")


@pytest.mark.parametrize("download", [lambda: download_tagger("someone/tagger"),
                                      lambda: download_clip("someone/clip", ("model.safetensors",))])
def test_encoder_downloads_report_hub_errors_and_pass_bugs_through(download, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raise(errors.LocalEntryNotFoundError("not cached")))
    with pytest.raises(UserError, match="could not be downloaded from the Hugging Face hub"):
        download()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raise(AttributeError("a bug")))
    with pytest.raises(AttributeError, match="a bug"):
        download()
