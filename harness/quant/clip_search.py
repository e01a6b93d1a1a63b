"""The weight clipping search of GPTQ's and QuaRot's ``Quantizer.find_params(mse=True)``.

For each row (an output channel, or a group of one) try the ranges p x [min, max] for
p = 1, 0.99, ..., 0.21 (``grid`` = 100 steps, ``max_shrink`` = 0.8) and keep the one whose
fake-quantized row has the smallest sum of |q - w|^``norm`` (2.4), the first one on ties
(IST-DASLab/gptq 2d65066 ``quant.py`` L48-L66; spcl/QuaRot 5008669 ``fake_quant/quant_utils.py``
``WeightQuantizer.find_params``, behind ``--w_clip``). Each range includes 0, as theirs do.
"""
from __future__ import annotations

import torch

from harness.bits import BitSpec
from harness.quant.quantizer import grid_bounds, grid_codes

# rows searched at once: bounds the (rows, columns) temporaries of one candidate
_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def clip_search_params(rows: torch.Tensor, spec: BitSpec, grid: int = 100, max_shrink: float = 0.8,
                       norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, 1) scale and zero point of the best shrunken range of each row of ``rows`` (float32)."""
    lo, hi = grid_bounds(spec.w_bits, spec.w_symmetric, spec.full_grid)
    levels = hi if spec.w_symmetric else hi - lo  # the official maxq
    scales, zeros = [], []
    step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for chunk in rows.float().split(step):
        xmin, xmax = chunk.amin(-1, keepdim=True).clamp(max=0), chunk.amax(-1, keepdim=True).clamp(min=0)
        if spec.w_symmetric:
            xmax = torch.maximum(xmin.abs(), xmax).clamp(min=1e-5)
        else:  # an all-zero row gets the range [-1, 1], as the official code sets it
            empty = (xmin == 0) & (xmax == 0)
            xmin, xmax = xmin.masked_fill(empty, -1), xmax.masked_fill(empty, 1)
        best = torch.full_like(xmin, float("inf"))
        scale, zero = torch.ones_like(xmin), torch.zeros_like(xmin)
        for i in range(int(max_shrink * grid)):
            p = 1 - i / grid
            # the official arithmetic, unclamped (harness.quant.quantizer.quant_params clamps the scale at 1e-5)
            s1 = p * xmax / levels if spec.w_symmetric else (p * xmax - p * xmin) / levels
            z1 = torch.zeros_like(s1) if spec.w_symmetric else torch.round(-(p * xmin) / s1)
            err = grid_codes(chunk, s1, z1, lo, hi).sub_(z1).mul_(s1).sub_(chunk).abs_().pow_(norm).sum(-1, keepdim=True)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s1, scale), torch.where(better, z1, zero)
        scales.append(scale)
        zeros.append(zero)
    return torch.cat(scales), torch.cat(zeros)
