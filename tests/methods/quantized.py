"""What every method must leave behind, checked from the outside: quantizers on at the spec's bits.

``assert_quantized(model, spec, count)``: ``count`` QuantLinears, each frozen (weight stored
quantized, weight quantizer gone) with at most 2**w_bits distinct values per weight row, and an
activation quantizer that is on at ``spec.a_bits`` with the spec's symmetry (off for A16) and
really quantizes: at most 2**a_bits distinct values per token, on a zero-centred grid exactly when the spec is symmetric.
"""
from __future__ import annotations

import torch
from torch import nn

from harness import BitSpec, quant_linears


def assert_quantized(model: nn.Module, spec: BitSpec, count: int) -> None:
    linears = dict(quant_linears(model))
    assert len(linears) == count, sorted(linears)
    g = torch.Generator().manual_seed(0)
    for name, linear in linears.items():
        assert linear.frozen and isinstance(linear.weight_quant, nn.Identity), name
        rows = linear.weight.detach().reshape(linear.weight.shape[0], -1, spec.w_group or linear.weight.shape[1])
        levels = max(len(torch.unique(group)) for group in rows.reshape(-1, rows.shape[-1]))
        assert levels <= 2**spec.w_bits, (name, levels)
        act = linear.act_quant
        x = torch.randn(2, 5, linear.in_features, generator=g, dtype=linear.weight.dtype)
        if spec.a_bits >= 16:
            assert not act.enabled and torch.equal(act(x), x), name
            continue
        assert act.enabled and act.bits == spec.a_bits and act.symmetric == spec.a_symmetric, (name, act)
        y = act(x)
        assert not torch.equal(y, x) and max(len(torch.unique(t)) for t in y.reshape(-1, y.shape[-1])) <= 2**spec.a_bits, name
        # symmetric: zero point 0, so every value is an integer multiple of max|x| / (2^(b-1) - 1); asymmetric: not
        steps = y / (x.abs().amax(-1, keepdim=True) / (2 ** (spec.a_bits - 1) - 1))
        assert bool((steps - steps.round()).abs().max() < 1e-3) == spec.a_symmetric, name
