"""GPTQ (Frantar et al., ICLR 2023) as a weight solver: round a linear's weight column by column and
spread each column's rounding error over the columns not yet rounded, weighted by the inverse Hessian
of the layer's reconstruction error, H = 2 X X^T / n over the calibration inputs X.

The solver follows the official code (IST-DASLab/gptq 2d65066, ``gptq.py`` ``GPTQ.add_batch`` /
``fasterquant``) step for step:

- ``Hessian.add``: H is a running mean, accumulated in float32 batch by batch (never the whole
  activation matrix at once): ``H *= n / (n + m); n += m; H += (sqrt(2 / n) X)^T (sqrt(2 / n) X)``.
- dead inputs (diag H = 0) get diag 1 and a zero weight column; dampening adds ``damp`` x mean(diag H)
  to the diagonal; H^-1 comes as the upper Cholesky factor of the inverse (``cholesky``,
  ``cholesky_inverse``, ``cholesky(upper=True)``), on one CPU thread: the blocked factorization rounds
  differently with each thread count (``harness.runtime.thread_count_independent``).
- columns go in blocks of ``block_size`` (lazy batch updates): inside a block each column is rounded
  and its error ``(w - q) / d`` updates the block's later columns; after the block, the columns
  beyond it get the block's errors at once.
- ``act_order``: columns by decreasing diag H. Groups (the bit spec's group size) take their range
  when the solver reaches their first column, from the weight as the official code reads it there
  (the columns of the current block do not yet carry that block's own updates); ``static_groups``
  takes every group's range up front from the original weight. ``act_order`` with groups needs
  ``static_groups``: otherwise a group's range would cover columns that are not contiguous in the
  stored weight, which no per-group scale can express (the official code's caveat).

The rounding grid is the bit spec's (``harness.quant.quantizer``): per output channel or per group,
asymmetric min/max (the official grid for a row with both signs) or ptqbench's symmetric grid. The
solver returns the rounded weight and the scale and zero point of each row of the grouped view, so the
weight stays exactly on its grid when a ``QuantLinear`` freezes it (``FixedGridQuantizer``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from harness.bits import BitSpec
from harness.errors import ConfigError, PtqbenchError
from harness.quant.clip_search import clip_search_params
from harness.quant.quantizer import grid_bounds, quant_params, row_range
from harness.runtime import thread_count_independent


class SingularHessianError(PtqbenchError):
    """The dampened Hessian is not positive definite (Cholesky failed)."""


class Hessian:
    """2 X^T X / n of a linear's inputs, accumulated batch by batch in float32 on ``device``."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.matrix = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.samples = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add one batch of inputs, (batch, ..., columns): each leading index but the last is one sample row."""
        batch = x.shape[0] if x.dim() > 2 else 1  # the official count: samples (sequences), not tokens
        rows = x.reshape(-1, x.shape[-1]).to(self.matrix.device, torch.float32)
        self.matrix *= self.samples / (self.samples + batch)
        self.samples += batch
        rows = rows * math.sqrt(2 / self.samples)
        self.matrix += rows.T @ rows


@dataclass(frozen=True)
class GPTQOptions:
    """The official ``fasterquant`` arguments (``blocksize``, ``percdamp``, ``actorder``, ``static_groups``),
    and ``zero_in_range``: each range is widened to include 0, as the official ``Quantizer.find_params``
    does (``xmin = min(min(w), 0)``, ``xmax = max(max(w), 0)``); false = the bit spec's plain min/max,
    as ptqbench's RTN (the same for a row or group with both signs). ``clip_search``: each range is
    the best shrunken one (``harness.quant.clip_search``; the official ``mse=True``, QuaRot's ``--w_clip``)."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    zero_in_range: bool = True
    clip_search: bool = False

    def check(self, spec: BitSpec) -> None:
        """Refuse option combinations the solver cannot represent, in one line, before any work."""
        if self.block_size < 1:
            raise ConfigError(f"block_size: {self.block_size} is not allowed; use an integer >= 1")
        if not self.damp > 0:
            raise ConfigError(f"damp: {self.damp} is not allowed; use a fraction > 0 of the mean diagonal (official 0.01)")
        if self.act_order and spec.w_group and not self.static_groups:
            raise ConfigError(f"act_order: with groups ({spec.name}) it needs static_groups: true (a group's range would "
                              "otherwise cover columns that are not contiguous in the weight, as the official code warns)")


def _params(w: torch.Tensor, spec: BitSpec, zero_in_range: bool, clip_search: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, 1) scale and zero point of ``w``'s rows (the solver's view: one range per row of ``w``)."""
    if clip_search:
        return clip_search_params(w, spec)
    xmin, xmax = row_range(w)
    if zero_in_range:
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    return quant_params(xmin, xmax, spec.w_bits, spec.w_symmetric)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: BitSpec) -> torch.Tensor:
    lo, hi = grid_bounds(spec.w_bits, spec.w_symmetric, spec.full_grid)
    return (torch.clamp(torch.round(w / scale) + zero, lo, hi) - zero) * scale


@torch.no_grad()
def gptq_solve(weight: torch.Tensor, hessian: torch.Tensor, spec: BitSpec, options: GPTQOptions = GPTQOptions()
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Round ``weight`` (out, in) for ``spec`` with GPTQ; return (Q, scale, zero, loss).

    ``scale`` and ``zero`` have one row per row of ``harness.quant.quantizer.group_view(Q, spec)``
    (per output channel, or per output channel and group, row-major); ``loss`` is the official
    ``sum((w - q)^2 / d^2) / 2``. ``hessian`` is not modified.
    """
    options.check(spec)
    if spec.w_granularity == "tensor":
        raise ConfigError(f"bits: {spec.name} quantizes weights per tensor; GPTQ solves per output channel or group")
    rows, columns = weight.shape
    group = spec.w_group or 0
    if group and columns % group:
        raise ConfigError(f"bits: group {group} does not divide the input width {columns}")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    if not group:
        # the official find_params on the whole weight, before dead columns are zeroed
        scale, zero = _params(W, spec, options.zero_in_range, options.clip_search)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = ([_params(W[:, g:g + group], spec, options.zero_in_range, options.clip_search) for g in range(0, columns, group)]
              if group and options.static_groups else [])
    perm = torch.argsort(torch.diag(H), descending=True) if options.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H[range(columns), range(columns)] += options.damp * torch.mean(torch.diag(H))
    try:
        with thread_count_independent(H):  # LAPACK's blocked Cholesky rounds differently per thread count
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise SingularHessianError(f"GPTQ: the Hessian of a {rows} x {columns} weight is not positive definite even with "
                                   f"damp {options.damp}; raise damp or use more calibration samples") from None
    Q = torch.zeros_like(W)
    scales = torch.zeros(rows, columns // group if group else 1, dtype=W.dtype, device=W.device)
    zeros = torch.zeros_like(scales)
    loss = torch.zeros((), dtype=torch.float64)
    for i1 in range(0, columns, options.block_size):
        i2 = min(i1 + options.block_size, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        for i in range(i2 - i1):
            column = i1 + i
            if group:
                index = (int(perm[column]) if perm is not None else column) // group
                if static:
                    scale, zero = static[index]
                elif column % group == 0:
                    # W, not W1: as official
                    scale, zero = _params(W[:, column:column + group], spec, options.zero_in_range, options.clip_search)
                scales[:, index:index + 1], zeros[:, index:index + 1] = scale, zero
            w, d = W1[:, i], Hinv1[i, i]
            q = _round(w.unsqueeze(1), scale, zero, spec).flatten()
            Q1[:, i] = q
            loss += (((w - q) ** 2) / d**2).sum().double() / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if not group:
        scales, zeros = scale, zero
    return Q.to(weight.dtype), scales.reshape(-1, 1), zeros.reshape(-1, 1), float(loss)


class FixedGridQuantizer(nn.Module):
    """A weight quantizer with the scale and zero point a solver chose (per row of the grouped view).

    A ``QuantLinear`` whose weight a solver rounded gets one, so that freezing keeps the solver's weight
    (already on this grid) and the exporter reads the solver's scale and zero point.
    """

    def __init__(self, spec: BitSpec, scale: torch.Tensor, zero: torch.Tensor) -> None:
        super().__init__()
        self.spec, self.enabled = spec, True
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero", zero.detach().clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        from harness.quant.quantizer import group_view

        grouped = group_view(w, self.spec)
        return _round(grouped, self.scale.to(w.dtype), self.zero.to(w.dtype), self.spec).reshape(w.shape)

    def quant_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero

    def extra_repr(self) -> str:
        return f"spec={self.spec.name}, solved grid"
