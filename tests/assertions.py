"""Assertions for "this is the same model": identical weights, and outputs equal up to float noise.

Outputs are compared with a tight tolerance rather than bit for bit: with identical weights, CPU
kernels still pick different vectorised paths for differently aligned buffers (a memory-mapped
safetensors file versus a freshly built module), which moves the last bit on some CPUs.
"""
from __future__ import annotations

import torch


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    want, got = a.state_dict(), b.state_dict()
    assert set(want) == set(got), sorted(set(want) ^ set(got))[:10]
    differing = [k for k in want if not torch.equal(want[k].to(got[k].dtype), got[k])]
    assert not differing, differing[:10]


def assert_same_output(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two state dicts (files) hold the same, non-empty set of tensors, bit for bit."""
    assert a, "no tensors to compare"
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing[:10]


def assert_tensors_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same non-empty set of tensors, and at least one of them differs."""
    assert a and a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    assert any(not torch.equal(a[k], b[k]) for k in a)
