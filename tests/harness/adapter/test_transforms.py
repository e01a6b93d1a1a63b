"""The adapter's general linear maps (``transform_input``, ``transform_output``) against dense matrix products.

The other transforms are checked on every family in test_families.py; these two touch one linear and its bias,
which no family changes, so a biased float64 linear and a random invertible (not orthogonal) M are enough.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.adapter import LlamaAdapter


def linear64(inputs: int, outputs: int) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(inputs, outputs, bias=True).double()


def invertible(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64)


def test_transform_input_with_the_inverse_transpose_online_leaves_the_output_equal():
    linear, m = linear64(6, 4), invertible(6, 1)
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = linear(x)
    bias = linear.bias.detach().clone()
    LlamaAdapter.transform_input(linear, lambda rows: rows @ m)
    assert torch.allclose(linear(x @ torch.linalg.inv(m).T), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(linear.bias, bias)


def test_transform_output_maps_the_output_and_the_bias():
    linear, m = linear64(6, 4), invertible(4, 2)
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = linear(x) @ m
    LlamaAdapter.transform_output(linear, lambda rows: rows @ m)
    assert torch.allclose(linear(x), expected, rtol=1e-12, atol=1e-12)
