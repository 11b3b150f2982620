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
