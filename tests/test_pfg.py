"""The PFG adapter and its file formats."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from library.models.pfg import (
    PFGAdapter,
    PFGShape,
    append_tokens,
    check_compatible,
    combine_features,
    load_pfg,
    pfg_metadata,
    save_pfg,
    uncond_tokens,
)


def _adapter(hidden: int = 0, seed: int = 0) -> PFGAdapter:
    torch.manual_seed(seed)
    return PFGAdapter(PFGShape(num_tokens=3, input_dim=8, cross_attention_dim=4, hidden_dim=hidden))


def test_token_i_is_rows_i_times_c():
    adapter = _adapter()
    feature = torch.randn(2, 8)
    tokens = adapter(feature)
    assert tokens.shape == (2, 3, 4)
    flat = adapter.pfg_linear(feature)
    for i in range(3):
        assert torch.equal(tokens[:, i], flat[:, i * 4 : (i + 1) * 4])


def test_scale_multiplies_after_the_linear_layer():
    adapter = _adapter()
    feature = torch.randn(1, 8)
    assert torch.allclose(adapter(feature, 0.5), 0.5 * adapter(feature))
    per_sample = adapter(torch.cat([feature, feature]), torch.tensor([1.0, 0.0]))
    assert torch.equal(per_sample[1], torch.zeros(3, 4))


@pytest.mark.parametrize("hidden", [0, 16])
def test_save_and_load_give_identical_tokens(tmp_path, hidden):
    adapter = _adapter(hidden)
    meta = pfg_metadata(adapter.shape, "model.onnx:abc")
    paths = save_pfg(adapter, tmp_path / "x-pfg.safetensors", meta, save_pt=True)
    assert [p.name for p in paths] == ["x-pfg.safetensors", "x-pfg.pt"]
    loaded, metadata = load_pfg(paths[0])
    assert metadata["pfg.num_tokens"] == "3" and metadata["pfg.encoder"] == "model.onnx:abc"
    assert metadata["pfg.head"] == ("mlp" if hidden else "linear")
    feature = torch.randn(2, 8)
    assert torch.equal(loaded(feature), adapter(feature))
    if hidden == 0:
        tensors = load_file(str(paths[0]))
        assert tensors["pfg_linear.weight"].shape == (12, 8) and tensors["pfg_linear.bias"].shape == (12,)
    # the .pt twin has no metadata: the token count comes from the model's width C
    loaded_pt, _ = load_pfg(paths[1], cross_attention_dim=4)
    assert torch.equal(loaded_pt(feature), adapter(feature))


def test_original_pt_formats_load(tmp_path):
    adapter = _adapter()
    bare = {"weight": adapter.pfg_linear.weight.detach(), "bias": adapter.pfg_linear.bias.detach()}
    torch.save(bare, tmp_path / "bare.pt")
    torch.save({"state_dict": {f"pfg_linear.{k}": v for k, v in bare.items()}}, tmp_path / "wrapped.pt")
    for name in ("bare.pt", "wrapped.pt"):
        loaded, _ = load_pfg(tmp_path / name, cross_attention_dim=4)
        assert loaded.shape == adapter.shape


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"pfg_linear.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="evil.pt"):
        load_pfg(tmp_path / "evil.pt", cross_attention_dim=4)
    assert not marker.exists()


def test_mismatched_widths_name_both_numbers():
    adapter = _adapter()
    with pytest.raises(UserError, match=r"D=8 .*D=1024"):
        check_compatible(adapter, "x-pfg.safetensors", input_dim=1024, cross_attention_dim=4)
    with pytest.raises(UserError, match=r"made for a model of cross-attention width C=4; this model's width is C=768 \(SD1.x\)"):
        check_compatible(adapter, "x-pfg.safetensors", input_dim=8, cross_attention_dim=768)


def test_a_head_of_another_model_family_says_which_width_it_was_made_for(tmp_path):
    """Original .pt files carry no metadata: the shape tells what it can (7 SD2.x tokens are 7168
    rows; 7 SDXL tokens, 14336, are also 14 of SD2.x's), never an impossible --pfg_num_tokens."""
    for tokens, width, expected in ((7, 1024, "C=1024 (SD2.x)"), (7, 2048, "C=1024 (SD2.x) or C=2048 (SDXL)")):
        path = tmp_path / f"head-{width}.pt"
        torch.save(PFGAdapter(PFGShape(tokens, 8, width)).state_dict(), path)
        with pytest.raises(UserError) as info:
            load_pfg(path, cross_attention_dim=768)
        assert f"made for a model of cross-attention width {expected}; this model's width is C=768 (SD1.x)" in str(info.value)
        assert "pfg_num_tokens" not in str(info.value)
    odd = tmp_path / "odd.pt"
    torch.save(PFGAdapter(PFGShape(3, 8, 100)).state_dict(), odd)
    with pytest.raises(UserError, match=r"odd.pt: its 300 output rows are not a whole number of tokens of any model family's width"):
        load_pfg(odd)


def test_not_a_pfg_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"something": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a PFG file"):
        load_pfg(tmp_path / "other.safetensors")


def test_uncond_padding_and_concatenation():
    text = torch.randn(2, 77, 4)
    zeros = uncond_tokens("zeros", text, 3)
    assert zeros.shape == (2, 3, 4) and not zeros.any()
    eos = uncond_tokens("eos", text, 3)
    assert torch.equal(eos, text[:, -1:].expand(2, 3, 4))
    assert append_tokens(text, zeros).shape == (2, 80, 4)
    assert append_tokens(text, None) is text


def test_weighted_combination_of_guides():
    a, b = torch.randn(8), torch.randn(8)
    assert torch.equal(combine_features([a, b], [1.0, 0.0]), a)
    assert torch.allclose(combine_features([a, b], [1.0, 3.0]), (a + 3 * b) / 4)
    with pytest.raises(UserError, match="sum to zero"):
        combine_features([a, b], [1.0, -1.0])
