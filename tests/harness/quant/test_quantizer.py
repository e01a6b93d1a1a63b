"""Quantizers against an independent integer computation (numpy, written from the definition)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.adapter import LlamaAdapter
from harness.bits import BitSpec
from harness.quant.quantizer import (
    ActQuantizer,
    dequantize_codes,
    grid_bounds,
    quantize_activation,
    quantize_weight,
    round_ste,
    weight_codes,
)


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


def _written_out(x, xmin, xmax, bits, symmetric):
    """fake_quantize as plain autograd ops (round_ste, clamp), independent of the fused node."""
    from harness.quant.quantizer import quant_params

    scale, zero = quant_params(xmin, xmax, bits, symmetric)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(round_ste(x / scale), -qmax, qmax) * scale
    return (torch.clamp(round_ste(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(40, 24), (2, 7, 24)])  # per-row weights, per-token activations
def test_fused_fake_quant_equals_the_written_out_form_with_gradients(symmetric, shape):
    """The fused autograd node: same values bit for bit, same gradients (to float64 rounding) for x and
    for learnable clipping factors (through scale and zero point), with values clipped off the grid."""
    from harness.quant.quantizer import fake_quantize

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3
    x0.view(-1, shape[-1])[:, 0] = 25.0  # far outside every clipped range: the clamp mask matters
    clip0 = torch.rand(*shape[:-1], 1, generator=gen, dtype=torch.float64) * 0.4 + 0.5
    grad_out = torch.randn(*shape, generator=gen, dtype=torch.float64)
    results = []
    for fn in (fake_quantize, _written_out):
        x, lo, hi = (t.clone().requires_grad_() for t in (x0, clip0, clip0.flip(0)))
        xmin = x.detach().amin(-1, keepdim=True) * lo
        xmax = x.detach().amax(-1, keepdim=True) * hi
        y = fn(x, xmin, xmax, 4, symmetric)
        (y * grad_out).sum().backward()
        results.append((y.detach(), x.grad, lo.grad, hi.grad))
    (y1, *grads1), (y2, *grads2) = results
    assert torch.equal(y1, y2)
    assert grads1[0].abs().sum() > 0 and (grads1[1].abs().sum() + grads1[2].abs().sum()) > 0  # (symmetric: max side only)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_row_range_gradient_goes_to_the_extremes():
    """row_range: amin/amax values; without ties the same gradient as autograd's amin/amax, with a
    tie the whole gradient on the first occurrence (a subgradient too; the total is the same)."""
    from harness.quant.quantizer import row_range

    x0 = torch.tensor([[1.0, -2.0, 5.0, 0.5], [3.0, 3.0, -1.0, -1.0]], dtype=torch.float64)
    g_min, g_max = torch.tensor([[2.0], [3.0]], dtype=torch.float64), torch.tensor([[5.0], [7.0]], dtype=torch.float64)
    x = x0.clone().requires_grad_()
    lo, hi = row_range(x)
    assert torch.equal(lo, x0.amin(-1, keepdim=True)) and torch.equal(hi, x0.amax(-1, keepdim=True))
    torch.autograd.backward([lo, hi], [g_min, g_max])
    ref = x0.clone().requires_grad_()
    torch.autograd.backward([ref.amin(-1, keepdim=True), ref.amax(-1, keepdim=True)], [g_min, g_max])
    assert torch.equal(x.grad[0], ref.grad[0])  # no tie in row 0
    assert x.grad[1].tolist() == [7.0, 0.0, 3.0, 0.0]  # ties: the first occurrence takes it all
    assert ref.grad[1].tolist() == [3.5, 3.5, 1.5, 1.5] and x.grad[1].sum() == ref.grad[1].sum()


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_non_finite_value_makes_its_row_nan_not_a_grid_value(symmetric):
    """An inf must not quantize to a finite value (the written-out STE form gives inf - inf = NaN):
    a broken weight has to show up as a NaN metric."""
    from harness.quant.quantizer import fake_quantize

    x = torch.randn(3, 8)
    x[1, 2] = float("inf")
    y = fake_quantize(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), 4, symmetric)
    assert y[1].isnan().all() and y[[0, 2]].isfinite().all()
    assert _written_out(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), 4, symmetric)[1].isnan().any()


def _official_asym(x, xmin, xmax, bits):
    """The official asymmetric UniformAffineQuantizer written out: round_ste on x / scale, plain round() on
    the zero point (OpenGVLab/OmniQuant 95fae1bd quantize/quantizer.py L103-110 and L152-159)."""
    scale = ((xmax - xmin) / (2**bits - 1)).clamp(1e-5, 1e4)
    zero = (-xmin / scale).clamp(-1e4, 1e4).round()
    return (torch.clamp(round_ste(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_point_without_gradient_is_the_official_round(dtype):
    """zero_point_grad=False: the values of the STE form bit for bit, the official quantizer's gradients,
    no gradient reaching the zero point; the STE form's gradients differ (values outside the clipped range)."""
    from harness.quant.quantizer import fake_quantize, quant_params

    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randn(40, 24, generator=gen, dtype=torch.float64) * 3).to(dtype)
    x0[:, 0] = 25.0  # outside every clipped range: the only place the zero point's gradient shows
    clip0 = (torch.rand(40, 1, generator=gen, dtype=torch.float64) * 0.4 + 0.5).to(dtype)
    grad_out = torch.randn(40, 24, generator=gen, dtype=torch.float64).to(dtype)

    def run(fn):
        x, lo, hi = (t.clone().requires_grad_() for t in (x0, clip0, clip0.flip(0)))
        y = fn(x, x.detach().amin(-1, keepdim=True) * lo, x.detach().amax(-1, keepdim=True) * hi)
        (y * grad_out).sum().backward()
        return y.detach(), x.grad, lo.grad, hi.grad

    off = run(lambda x, a, b: fake_quantize(x, a, b, 4, False, zero_point_grad=False))
    ste = run(lambda x, a, b: fake_quantize(x, a, b, 4, False))
    official = run(lambda x, a, b: _official_asym(x, a, b, 4))
    assert torch.equal(off[0], ste[0]) and torch.equal(off[0], official[0])
    for ours, theirs in zip(off[1:], official[1:]):
        torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(off[2], ste[2])  # the min side's clipping factor: the zero point's path
    lo = clip0.clone().requires_grad_()
    xmin, xmax = x0.amin(-1, keepdim=True) * lo, x0.amax(-1, keepdim=True)
    _, zero = quant_params(xmin, xmax, 4, False, zero_point_grad=False)
    _, zero_ste = quant_params(xmin, xmax, 4, False)
    assert torch.equal(zero, zero_ste) and not zero.requires_grad
    (grad,) = torch.autograd.grad(zero_ste.sum(), lo)
    assert grad.abs().sum() > 0  # the STE zero point does pass a gradient


def test_set_zero_point_grad_reaches_every_quantizer_of_a_block(tiny_model):
    from harness import quantize_block
    from harness.quant.quantizer import WeightQuantizer, set_zero_point_grad

    layer = tiny_model.model.layers[0]
    quantize_block(layer, BitSpec.parse("W4A4", attention=True), LlamaAdapter())
    quantizers = [m for m in layer.modules() if isinstance(m, (ActQuantizer, WeightQuantizer))]
    assert len(quantizers) == 7 * 2 + 3  # act + weight per linear, and the Q, K and V quantizers
    assert all(q.zero_point_grad for q in quantizers)
    assert set_zero_point_grad(layer, False) == len(quantizers)
    assert not any(q.zero_point_grad for q in quantizers)
    assert all(q.zero_point_grad for q in tiny_model.model.layers[1].modules() if hasattr(q, "zero_point_grad"))


@pytest.mark.parametrize("scheme", [
    ("W4A16", {}), ("W3A16", {"w_symmetric": True}), ("W4A16g16", {}), ("W8A8", {"w_symmetric": True}),
    ("W2A16", {"w_granularity": "tensor"}),
])
def test_weight_codes_dequantize_to_the_fake_quantized_weight_bit_for_bit(scheme):
    name, fields = scheme
    spec = BitSpec.parse(name, **fields)
    w = torch.randn(24, 48, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3.0, 48)
    w[3] = 0.0  # an all-zero row: the scale clamps to SCALE_MIN
    codes, scale, zero = weight_codes(w, spec)
    assert codes.element_size() == 1 and codes.dtype == (torch.int8 if spec.w_symmetric else torch.uint8)
    assert int(codes.min()) >= (-(2 ** (spec.w_bits - 1)) if spec.w_symmetric else 0)
    assert int(codes.max()) <= (2 ** (spec.w_bits - 1) - 1 if spec.w_symmetric else 2**spec.w_bits - 1)
    assert torch.equal(dequantize_codes(codes, scale, zero, w.shape), quantize_weight(w, spec))


def test_weight_codes_refuse_what_they_cannot_hold():
    w = torch.randn(8, 16)
    assert weight_codes(w, BitSpec.parse("W16A16")) is None  # weights not quantized
    w[2, 5] = float("inf")  # the fake-quantized row is NaN, no integer grid holds it
    assert weight_codes(w, BitSpec.parse("W4A16")) is None


def test_the_full_symmetric_grid_reaches_minus_two_to_the_b_minus_one():
    """A clip ratio leaves values beyond the range: the full grid rounds the most negative to -8, the restricted one to -7."""
    assert grid_bounds(4, True) == (-7, 7) and grid_bounds(4, True, full=True) == (-8, 7)
    assert grid_bounds(4, False, True) == (0, 15)
    x = torch.tensor([[-1.0, 0.5, 0.25, 0.9]])
    scale = 0.9 * 1.0 / 7
    full, restricted = ActQuantizer(4, True, 0.9, full_grid=True)(x), ActQuantizer(4, True, 0.9)(x)
    assert full[0, 0].item() == pytest.approx(-8 * scale) and restricted[0, 0].item() == pytest.approx(-7 * scale)
    assert torch.equal(full[0, 1:], restricted[0, 1:])


def test_each_side_of_the_activation_range_takes_its_own_clip_ratio():
    """clip_ratio_min (a learned clip, FlatQuant's LAC): the row's max times clip_ratio, its min times clip_ratio_min,
    then the usual grids; against numpy from the definition (the symmetric range is the larger side)."""
    x = torch.randn(6, 32, dtype=torch.float64)
    hi, lo = 0.8, 0.6
    rows = x.numpy()
    for symmetric in (False, True):
        got = ActQuantizer(4, symmetric, clip_ratio=hi, clip_ratio_min=lo)(x).numpy()
        for row, out in zip(rows, got):
            xmin, xmax = row.min() * lo, row.max() * hi
            if symmetric:
                scale = max(abs(xmin), abs(xmax)) / 7
                expected = np.clip(np.round(row / scale), -7, 7) * scale
            else:
                scale = (xmax - xmin) / 15
                zero = np.round(-xmin / scale)
                expected = (np.clip(np.round(row / scale) + zero, 0, 15) - zero) * scale
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    assert torch.equal(ActQuantizer(4, clip_ratio=hi, clip_ratio_min=hi)(x), ActQuantizer(4, clip_ratio=hi)(x))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as stored: NaN at the same places, every other value with the same bits (so -0 is not +0)."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.masked_fill(nan, 0).view(ints), b.masked_fill(nan, 0).view(ints))


def _awkward_rows(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random rows with an outlier channel, plus rows that reach every special case of the range."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3.0, shape[-1], dtype=torch.float64)
    rows = x.view(-1, shape[-1])
    rows[:, 3] *= 40  # an outlier channel
    rows[0] = 0.0  # all zero: the scale clamps to SCALE_MIN
    rows[1] = 2.5  # constant: zero width, x / scale far off the grid
    rows[2] = torch.linspace(-1e-3, 1e-4, shape[-1])  # values rounding to -0 on a symmetric grid
    rows[2, -1] = 1.0
    rows[3, 5] = float("inf")  # a non-finite range: the row is NaN
    rows[4, 1] = float("nan")
    rows[5] = torch.linspace(-3e5, 2e5, shape[-1])  # a scale beyond SCALE_MAX
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(12, 48), (2, 3, 8, 16)])  # tokens x features, (batch, heads, tokens, head_dim)
@pytest.mark.parametrize("symmetric, full_grid", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("clips", [(1.0, None), (0.9, None), (0.8, 0.6)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_evaluation_path_is_the_training_path_bit_for_bit(dtype, shape, symmetric, full_grid, clips, bits):
    """quantize_activation without autograd (quantize_rows) gives the STE node's values bit for bit, the sign of
    zero and the NaN rows included, for every grid, clip ratio, bit width and dtype."""
    x = _awkward_rows(shape, dtype)
    clip_ratio, clip_ratio_min = clips
    args = (bits, symmetric, True, clip_ratio, full_grid, clip_ratio_min)
    with torch.enable_grad():
        reference = quantize_activation(x.clone().requires_grad_(), *args)
    assert reference.grad_fn is not None  # the training path ran
    fast = quantize_activation(x, *args)
    assert fast.grad_fn is None and _same_bits(fast, reference.detach())
    with torch.no_grad():  # a tensor that requires grad, evaluated without autograd, takes the evaluation path
        assert _same_bits(quantize_activation(x.clone().requires_grad_(), *args), fast)
    assert fast.view(-1, shape[-1])[3].isnan().all() and (fast.view(-1, shape[-1])[2] == 0).any()


def test_the_training_path_keeps_its_gradient():
    """An input that needs a gradient goes through the STE node: its gradient is the written-out form's (the clamp
    mask, and the range's path to the row's extremes)."""
    x0 = torch.randn(6, 16, dtype=torch.float64) * 2
    grad_out = torch.randn(6, 16, dtype=torch.float64)
    x = x0.clone().requires_grad_()
    y = ActQuantizer(4, clip_ratio=0.7)(x)
    assert y.grad_fn is not None
    (y * grad_out).sum().backward()
    ref = x0.clone().requires_grad_()
    (_written_out(ref, ref.amin(-1, keepdim=True) * 0.7, ref.amax(-1, keepdim=True) * 0.7, 4, False) * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-12, atol=1e-12)
    assert (x.grad != grad_out).any()  # values outside the clipped range pass none of it
