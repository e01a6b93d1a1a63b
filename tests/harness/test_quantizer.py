"""Quantizers against an independent integer computation (numpy, written from the definition)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.bits import BitSpec
from harness.quantizer import ActQuantizer, quantize_activation, quantize_weight, round_ste


def reference_asym(x: np.ndarray, bits: int) -> np.ndarray:
    """Asymmetric min/max quantization of each row, straight from the definition."""
    out = np.empty_like(x)
    for i, row in enumerate(x):
        lo, hi = row.min(), row.max()
        scale = max((hi - lo) / (2**bits - 1), 1e-5)
        zero = np.round(-lo / scale)
        q = np.clip(np.round(row / scale) + zero, 0, 2**bits - 1)
        out[i] = (q - zero) * scale
    return out


def reference_sym(x: np.ndarray, bits: int) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(x).max(axis=1, keepdims=True) / qmax, 1e-5)
    return np.clip(np.round(x / scale), -qmax, qmax) * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_per_channel_weight_matches_reference(bits):
    w = torch.randn(16, 64, dtype=torch.float64)
    got = quantize_weight(w, BitSpec(w_bits=bits)).numpy()
    np.testing.assert_allclose(got, reference_asym(w.numpy(), bits), rtol=0, atol=1e-12)
    sym = quantize_weight(w, BitSpec(w_bits=bits, w_symmetric=True)).numpy()
    np.testing.assert_allclose(sym, reference_sym(w.numpy(), bits), rtol=0, atol=1e-12)


def test_grid_has_at_most_2_to_the_bits_levels_per_row():
    w = torch.randn(8, 256)
    for bits in (2, 3, 4):
        q = quantize_weight(w, BitSpec(w_bits=bits))
        assert all(len(torch.unique(row)) <= 2**bits for row in q)


def test_group_and_tensor_granularity():
    w = torch.randn(4, 256, dtype=torch.float64)
    grouped = quantize_weight(w, BitSpec(w_bits=4, w_group=64))
    expected = reference_asym(w.reshape(-1, 64).numpy(), 4).reshape(4, 256)
    np.testing.assert_allclose(grouped.numpy(), expected, atol=1e-12)
    per_tensor = quantize_weight(w, BitSpec(w_bits=4, w_granularity="tensor"))
    np.testing.assert_allclose(per_tensor.numpy(), reference_asym(w.reshape(1, -1).numpy(), 4).reshape(4, 256), atol=1e-12)
    # finer granularity fits the data at least as well
    err = lambda q: (q - w).pow(2).mean().item()  # noqa: E731
    assert err(grouped) <= err(quantize_weight(w, BitSpec(w_bits=4))) <= err(per_tensor)


def test_group_size_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        quantize_weight(torch.randn(4, 100), BitSpec(w_bits=4, w_group=64))


def test_activation_quantization_is_per_token():
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    x[0, 0] *= 100  # an outlier token must not change the other tokens' grids
    got = quantize_activation(x, 4)
    np.testing.assert_allclose(got.reshape(-1, 32).numpy(), reference_asym(x.reshape(-1, 32).numpy(), 4), atol=1e-12)
    assert quantize_activation(x, 16) is x
    assert not ActQuantizer(16).enabled and ActQuantizer(8).enabled


def test_more_bits_less_error():
    w = torch.randn(32, 128)
    errors = [(quantize_weight(w, BitSpec(w_bits=b)) - w).pow(2).mean().item() for b in (2, 3, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True)


def test_straight_through_estimator_passes_gradients():
    x = torch.randn(10, requires_grad=True)
    round_ste(x * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    w = torch.randn(4, 16, requires_grad=True)
    quantize_weight(w, BitSpec(w_bits=4)).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_clip_factors_shrink_the_range():
    w = torch.randn(4, 64)
    half = torch.full((4, 1), 0.5)
    clipped = quantize_weight(w, BitSpec(w_bits=8), clip_min=half, clip_max=half)
    assert (clipped.amax(dim=1) <= w.amax(dim=1) * 0.5 + 1e-2).all()
