"""The clip search against a transcription of the official loop (spcl/QuaRot ``WeightQuantizer.find_params``
with ``mse=True``, IST-DASLab/gptq ``Quantizer.find_params``), written out row by row."""
from __future__ import annotations

import pytest
import torch

from harness.bits import BitSpec
from harness.quant.clip_search import clip_search_params
from harness.quant.quantizer import grid_bounds


def official(w: torch.Tensor, bits: int, sym: bool, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4):
    """The official find_params(mse=True) for a (rows, columns) weight: (rows, 1) scale and zero."""
    maxq = 2 ** (bits - 1) - 1 if sym else 2**bits - 1
    zeros_ = torch.zeros(w.shape[0])
    xmin, xmax = torch.minimum(w.min(1)[0], zeros_), torch.maximum(w.max(1)[0], zeros_)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax).clamp(min=1e-5)
        scale, zero = xmax / maxq, torch.zeros_like(xmax)
    else:
        scale = (xmax - xmin).clamp(min=1e-5) / maxq
        zero = torch.round(-xmin / scale)
    best = torch.full([w.shape[0]], float("inf"))
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        if sym:
            s1, z1 = p * xmax / maxq, torch.zeros_like(xmax)
            q = torch.clamp(torch.round(w / s1[:, None]), -(maxq + 1), maxq) * s1[:, None]
        else:
            s1 = (p * xmax - p * xmin) / maxq
            z1 = torch.round(-p * xmin / s1)
            q = (torch.clamp(torch.round(w / s1[:, None]) + z1[:, None], 0, maxq) - z1[:, None]) * s1[:, None]
        err = (q - w).abs().pow(norm).sum(1)
        better = err < best
        best[better], scale[better], zero[better] = err[better], s1[better], z1[better]
    return scale[:, None], zero[:, None]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [3, 4])
def test_the_search_picks_the_official_range(sym, bits):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(bits)) * torch.rand(48, 1) ** 3
    spec = BitSpec(w_bits=bits, w_symmetric=sym, symmetric_grid="full")
    scale, zero = clip_search_params(w, spec)
    want_scale, want_zero = official(w, bits, sym)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(zero, want_zero, rtol=0, atol=0)
    full_range = clip_search_params(w, spec, max_shrink=0.01)[0]  # p = 1 alone: the min/max range
    assert (scale < full_range * 0.999).any()  # the search clipped some rows


def test_the_search_never_does_worse_than_the_full_range():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    spec = BitSpec(w_bits=4, w_symmetric=True)
    lo, hi = grid_bounds(4, True)

    def error(scale):
        return ((torch.clamp(torch.round(w / scale), lo, hi) * scale - w).abs().pow(2.4)).sum(1)

    scale, _ = clip_search_params(w, spec)
    assert (error(scale) <= error(w.abs().amax(1, keepdim=True) / hi) + 1e-6).all()


def test_rows_are_searched_in_chunks_with_the_same_result(monkeypatch):
    w = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    spec = BitSpec(w_bits=4, w_symmetric=False)
    whole = clip_search_params(w, spec)
    monkeypatch.setattr("harness.quant.clip_search._CHUNK_ELEMENTS", 16 * 3)
    for a, b in zip(whole, clip_search_params(w, spec)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
