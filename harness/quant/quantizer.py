"""Uniform fake quantization with a straight-through estimator.

Fake quantization rounds a tensor to the grid a b-bit integer format can represent and maps it
back to floating point, so the network computes with exactly the values an integer kernel would
see. Rounding uses a straight-through estimator (STE), so methods that learn clipping ranges,
scales or low-rank corrections can backpropagate through the quantizer. The zero point rounds with
an STE too unless a quantizer's ``zero_point_grad`` is off: then it rounds with a plain
``round()``, as the official OmniQuant and QLLM quantizers do, and no gradient goes through it
(the same values; only the gradient of the range differs). Methods switch it per block with
:func:`set_zero_point_grad`.

Weights: static, per output channel (default), per group of input channels, or per tensor.
Activations: dynamic per token (a scale per row of the last dimension), as in the QLLM, OmniQuant
and SmoothQuant (per-token variant) papers.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.bits import BitSpec

# OmniQuant/QLLM clamp scales to this range so an all-zero channel never divides by zero.
SCALE_MIN, SCALE_MAX = 1e-5, 1e4


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def quant_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool,
                 zero_point_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and integer zero point of the range [xmin, xmax] (zero point 0 when ``symmetric``).

    Asymmetric: scale = (xmax - xmin) / (2^b - 1) and an integer zero point, grid [0, 2^b - 1].
    Symmetric: scale = max(|xmin|, |xmax|) / (2^(b-1) - 1), zero point 0, grid [-(2^(b-1) - 1), 2^(b-1) - 1]
    (the restricted range SmoothQuant uses, so +x and -x quantize alike).
    ``zero_point_grad=False``: the zero point carries no gradient (same value).
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (torch.maximum(xmin.abs(), xmax.abs()) / qmax).clamp(SCALE_MIN, SCALE_MAX)
        return scale, torch.zeros_like(scale)
    scale = ((xmax - xmin) / (2**bits - 1)).clamp(SCALE_MIN, SCALE_MAX)
    if not zero_point_grad:
        # the official quantizers' plain round(), whose gradient is zero (OpenGVLab/OmniQuant 95fae1bd
        # quantize/quantizer.py L155-159, ModelTC/QLLM 653a329e quantize/quantizer.py L152-153); detached,
        # so autograd keeps nothing for it. round_ste's value is the same: r - x and (r - x) + x are exact.
        return scale, (-xmin / scale).detach().round().clamp(-SCALE_MAX, SCALE_MAX)
    return scale, round_ste(-xmin / scale).clamp(-SCALE_MAX, SCALE_MAX)


class _RowRange(torch.autograd.Function):
    """``(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True))`` whose gradient goes to the position of
    each extreme (``scatter``), instead of autograd's mask of every element equal to it.

    The masks cost four full-size passes per call (compare, bool -> int64 copy, sum, divide) and were
    the largest elementwise item left in block-wise training. The gradients are the same except in a
    row whose extreme value occurs more than once: there the whole gradient goes to the first
    occurrence instead of being split between them (both are valid subgradients of min/max).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        xmin, imin = x.min(dim=-1, keepdim=True)
        xmax, imax = x.max(dim=-1, keepdim=True)
        ctx.save_for_backward(imin, imax)
        ctx.shape = x.shape
        return xmin, xmax

    @staticmethod
    def backward(ctx, grad_min: torch.Tensor, grad_max: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        imin, imax = ctx.saved_tensors
        grad = grad_min.new_zeros(ctx.shape)
        return grad.scatter_add_(-1, imin, grad_min).scatter_add_(-1, imax, grad_max)


def row_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max along the last dimension (keepdim), differentiable (see :class:`_RowRange`)."""
    if not x.requires_grad:
        return x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    return _RowRange.apply(x)


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


def grid_bounds(bits: int, symmetric: bool, full: bool = False) -> tuple[int, int]:
    """The integer grid [lo, hi] of ``bits``: [-(2^(b-1) - 1), 2^(b-1) - 1] symmetric ([-2^(b-1), 2^(b-1) - 1]
    with ``full``, ``BitSpec.symmetric_grid``), else [0, 2^b - 1]."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax - int(full), qmax
    return 0, 2**bits - 1


def grid_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``clamp(round(x / s) + z, lo, hi)``: the grid values (as floats) fake quantization maps back."""
    return (x / scale).round_().add_(zero).clamp_(lo, hi)


class _FakeQuant(torch.autograd.Function):
    """``(clamp(round(x / s) + z, lo, hi) - z) * s`` with a straight-through round, in one node.

    The same function and the same gradients as writing it out with :func:`round_ste` (x: the clamp
    mask; s: ``(c - z) - mask * x / s``; z: ``s * (mask - 1)``, each summed over the broadcast
    dimensions), but the forward pass works in place on one buffer and nothing of the size of ``x``
    is kept for the backward pass except ``x`` itself. Autograd of the written-out form allocates
    and keeps about ten tensors of that size per call, which made the elementwise work cost more
    than the matmuls in block-wise training of 4-bit weights (OmniQuant, QLLM) on CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, scale, zero)
        ctx.lo, ctx.hi = lo, hi
        return grid_codes(x, scale, zero, lo, hi).sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, scale, zero = ctx.saved_tensors
        xs = x / scale
        q = xs.round().add_(zero)
        outside = (q < ctx.lo).logical_or_(q > ctx.hi)  # masks, not multiplications: no bool -> float copies
        grad_x = grad.masked_fill(outside, 0) if ctx.needs_input_grad[0] else None
        grad_scale = grad_zero = None
        if ctx.needs_input_grad[1]:
            # (c - z) - inside * x / s, with c = clamp(q): the zero-point terms cancel inside the range
            local = q.clamp_(ctx.lo, ctx.hi).sub_(zero).sub_(xs.masked_fill_(outside, 0))
            grad_scale = _reduce_to(local.mul_(grad), scale)
        if ctx.needs_input_grad[2]:
            grad_zero = _reduce_to((grad * scale).masked_fill_(outside.logical_not_(), 0).neg_(), zero)
        return grad_x, grad_scale, grad_zero, None, None


def fake_quantize(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool,
                  zero_point_grad: bool = True, full_grid: bool = False) -> torch.Tensor:
    """Quantize ``x`` to ``bits`` with the range [xmin, xmax] (broadcast against ``x``) and dequantize
    (scale and zero point from :func:`quant_params`; ``full_grid``: see :func:`grid_bounds`)."""
    scale, zero = quant_params(xmin, xmax, bits, symmetric, zero_point_grad)
    # A range with an inf in it gives NaN, as the written-out form does (round_ste computes inf - inf),
    # so a broken weight or activation ends as a NaN metric instead of rounding to a finite grid value.
    scale = torch.where(torch.isfinite(xmin) & torch.isfinite(xmax), scale, torch.nan)
    return _FakeQuant.apply(x, scale, zero, *grid_bounds(bits, symmetric, full_grid))


def group_view(w: torch.Tensor, spec: BitSpec) -> torch.Tensor:
    """Reshape a (out, in) weight so that one quantization range covers the last dimension."""
    if spec.w_granularity == "tensor":
        return w.reshape(1, -1)
    if spec.w_group:
        if w.shape[-1] % spec.w_group:
            raise ValueError(f"weight input width {w.shape[-1]} is not divisible by group size {spec.w_group}")
        return w.reshape(-1, spec.w_group)
    return w


def _weight_range(w: torch.Tensor, spec: BitSpec, clip_min: torch.Tensor | None,
                  clip_max: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grouped = group_view(w, spec)
    xmin, xmax = row_range(grouped)
    if clip_min is not None:
        xmin = xmin * clip_min
    if clip_max is not None:
        xmax = xmax * clip_max
    return grouped, xmin, xmax


def quantize_weight(
    w: torch.Tensor,
    spec: BitSpec,
    clip_min: torch.Tensor | None = None,
    clip_max: torch.Tensor | None = None,
    zero_point_grad: bool = True,
) -> torch.Tensor:
    """Fake-quantize a (out, in) weight per ``spec``.

    ``clip_min`` / ``clip_max`` are optional factors in [0, 1] (shape (rows, 1) of the grouped view)
    that shrink the min/max range before quantizing: the hook learnable weight clipping uses.
    """
    if not spec.quantizes_weights:
        return w
    grouped, xmin, xmax = _weight_range(w, spec, clip_min, clip_max)
    return fake_quantize(grouped, xmin, xmax, spec.w_bits, spec.w_symmetric, zero_point_grad, spec.full_grid).reshape(w.shape)


def weight_quant_params(
    w: torch.Tensor,
    spec: BitSpec,
    clip_min: torch.Tensor | None = None,
    clip_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rows, 1) scale and zero point per row of the grouped view that :func:`quantize_weight` uses.

    An exporter writes integer weights with them: ``(q - zero) * scale`` is bit for bit the fake-quantized weight.
    """
    _, xmin, xmax = _weight_range(w, spec, clip_min, clip_max)
    return quant_params(xmin, xmax, spec.w_bits, spec.w_symmetric)


def weight_codes(w: torch.Tensor, spec: BitSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``quantize_weight(w, spec)`` as its integer grid values: (codes, scale, zero) with
    ``dequantize_codes(codes, scale, zero, w.shape)`` equal to it bit for bit (the same float
    :func:`grid_codes` as :class:`_FakeQuant`'s forward; the codes are small integers, exact in any dtype).

    Codes take 1 byte per weight up to 8 bits (4 for a float32 weight): a frozen weight kept this
    way costs a quarter of its fake-quantized copy. None when the range is not finite (the
    fake-quantized weight is NaN there, which the codes cannot hold) or weights are not quantized.
    """
    if not spec.quantizes_weights:
        return None
    grouped, xmin, xmax = _weight_range(w, spec, None, None)
    if not (torch.isfinite(xmin).all() and torch.isfinite(xmax).all()):
        return None
    scale, zero = quant_params(xmin, xmax, spec.w_bits, spec.w_symmetric)
    lo, hi = grid_bounds(spec.w_bits, spec.w_symmetric, spec.full_grid)
    dtype = torch.uint8 if 0 <= lo and hi <= 255 else torch.int8 if -128 <= lo and hi <= 127 else torch.int16
    return grid_codes(grouped, scale, zero, lo, hi).to(dtype), scale, zero


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``(codes - zero) * scale`` in the scale's dtype, reshaped to the weight's ``shape`` (see :func:`weight_codes`)."""
    return codes.to(scale.dtype).sub_(zero).mul_(scale).reshape(shape)


def quantize_activation(x: torch.Tensor, bits: int, symmetric: bool = False, zero_point_grad: bool = True,
                        clip_ratio: float = 1.0, full_grid: bool = False, clip_ratio_min: float | None = None) -> torch.Tensor:
    """Dynamic per-token fake quantization: one range per vector along the last dimension, times ``clip_ratio``
    (its minimum times ``clip_ratio_min`` when given: a learned clip of each side, FlatQuant's LAC).

    Without autograd (no gradient needed for ``x``: evaluation) the values come from :func:`quantize_rows`,
    the same numbers bit for bit in fewer operations; with it, from :func:`fake_quantize`'s STE node.
    """
    if bits >= 16:
        return x
    if not (x.requires_grad and torch.is_grad_enabled()):
        return quantize_rows(x, bits, symmetric, clip_ratio, full_grid, clip_ratio_min)
    xmin, xmax = row_range(x)
    if clip_ratio != 1.0 or clip_ratio_min is not None:
        xmin, xmax = xmin * (clip_ratio if clip_ratio_min is None else clip_ratio_min), xmax * clip_ratio
    return fake_quantize(x, xmin, xmax, bits, symmetric, zero_point_grad, full_grid)


def quantize_rows(x: torch.Tensor, bits: int, symmetric: bool = False, clip_ratio: float = 1.0, full_grid: bool = False,
                  clip_ratio_min: float | None = None) -> torch.Tensor:
    """:func:`quantize_activation`'s values, bit for bit, for evaluation: no autograd node, no gradient bookkeeping.

    The same float operations in the same order (amin/amax per row, scale and zero point as :func:`quant_params`,
    the clamped grid value minus the zero point times the scale), written as one new tensor updated in place:
    the per-row work is a handful of (rows, 1) operations and the per-element work one division and four passes
    (three with a symmetric grid, where the zero point is 0). ``round_ste``'s value is the plain ``round``: r - x
    and (r - x) + x are exact. The symmetric form adds ``0.0`` instead of a zero tensor so that a value rounding to
    -0 ends as +0, as ``(c + 0) - 0`` makes it in the written-out form. (``torch.aminmax`` would read the rows once
    instead of twice, but its CPU kernel is several times slower than ``amin`` and ``amax`` together.)
    """
    if bits >= 16:
        return x
    xmin, xmax = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    if clip_ratio != 1.0 or clip_ratio_min is not None:
        xmin, xmax = xmin * (clip_ratio if clip_ratio_min is None else clip_ratio_min), xmax * clip_ratio
    lo, hi = grid_bounds(bits, symmetric, full_grid)
    finite = torch.isfinite(xmin).logical_and_(torch.isfinite(xmax))
    if symmetric:
        scale = (torch.maximum(xmin.abs_(), xmax.abs_()) / (2 ** (bits - 1) - 1)).clamp_(SCALE_MIN, SCALE_MAX)
        scale.masked_fill_(finite.logical_not_(), torch.nan)
        return torch.div(x, scale).round_().clamp_(lo, hi).add_(0.0).mul_(scale)
    scale = ((xmax - xmin) / (2**bits - 1)).clamp_(SCALE_MIN, SCALE_MAX)
    zero = (-xmin / scale).round_().clamp_(-SCALE_MAX, SCALE_MAX)
    scale.masked_fill_(finite.logical_not_(), torch.nan)
    return torch.div(x, scale).round_().add_(zero).clamp_(lo, hi).sub_(zero).mul_(scale)


class ActQuantizer(nn.Module):
    """Per-token dynamic activation quantizer; ``enabled = False`` makes it the identity."""

    # class defaults, so a block pickled before the attributes existed (a checkpoint) still runs
    zero_point_grad: bool = True
    clip_ratio: float = 1.0
    clip_ratio_min: float | None = None  # the minimum's own ratio (None: clip_ratio); a learned clip sets both
    full_grid: bool = False

    def __init__(self, bits: int, symmetric: bool = False, clip_ratio: float = 1.0, full_grid: bool = False,
                 clip_ratio_min: float | None = None) -> None:
        super().__init__()
        self.bits, self.symmetric, self.enabled = bits, symmetric, bits < 16
        if clip_ratio != 1.0:
            self.clip_ratio = clip_ratio
        if clip_ratio_min is not None:
            self.clip_ratio_min = clip_ratio_min
        if full_grid:
            self.full_grid = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return quantize_activation(x, self.bits, self.symmetric, self.zero_point_grad, self.clip_ratio, self.full_grid,
                                   self.clip_ratio_min)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, enabled={self.enabled}"
                + ("" if self.zero_point_grad else ", zero_point_grad=False")
                + ("" if self.clip_ratio == 1.0 else f", clip_ratio={self.clip_ratio}")
                + ("" if self.clip_ratio_min is None else f", clip_ratio_min={self.clip_ratio_min}")
                + (", full_grid=True" if self.full_grid and self.symmetric else ""))


class WeightQuantizer(nn.Module):
    """Min/max weight quantizer for one spec. Methods may swap in their own module (e.g. learned clipping)."""

    zero_point_grad: bool = True  # see ActQuantizer

    def __init__(self, spec: BitSpec) -> None:
        super().__init__()
        self.spec, self.enabled = spec, spec.quantizes_weights

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return quantize_weight(w, self.spec, zero_point_grad=self.zero_point_grad) if self.enabled else w

    def quant_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weight_quant_params(w, self.spec)

    def extra_repr(self) -> str:
        return f"spec={self.spec.name}, granularity={self.spec.w_granularity}, symmetric={self.spec.w_symmetric}"


def set_zero_point_grad(module: nn.Module, enabled: bool) -> int:
    """Set ``zero_point_grad`` on every quantizer inside ``module`` (any submodule that has the
    attribute, a method's own quantizers included); return how many were set."""
    quantizers = [m for m in module.modules() if hasattr(m, "zero_point_grad")]
    for q in quantizers:
        q.zero_point_grad = enabled
    return len(quantizers)
