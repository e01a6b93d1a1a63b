"""QLLM efficient error correction: low-rank weight corrections trained block-wise, then merged.

Official code (ModelTC/QLLM ``quantize/int_linear_lora.py``, ``quantize/qllm.py``): every linear of
the block gets A (r, in) Kaiming-uniform(a=sqrt(5)) and B (out, r) zero with scaling alpha / r;
while training the layer computes ``F.linear(Q(x), Q(W) + B @ A * s)`` with W frozen. AdamW
(weight decay 0) with a linear learning-rate decay trains A, B (and, official default, the blocks'
RMSNorm weights) on MSE(student on quantized inputs, teacher on FP inputs). After training
``W <- W + s * B @ A``, which the layer's weight quantizer then rounds: inference is a plain
quantized linear. Then the final RMSNorm is tuned on the last block's outputs, by default with an
added bias (the official ``LearnableLlamaRMSNorm``); here that bias is folded into an ``lm_head``
bias, which is exact because lm_head is linear and kept in full precision.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from harness import QuantLinear


class LowRankWeight(nn.Module):
    """A ``QuantLinear.weight_quant`` that returns Q(W) + s * B @ A.

    W is frozen while the correction trains, so Q(W) is computed once and cached (detached).
    """

    def __init__(self, inner: nn.Module, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.inner, self.scaling = inner, alpha / rank
        out_features, in_features = weight.shape
        a = torch.empty(rank, in_features)
        # nn.init.kaiming_uniform_(a=sqrt(5)) with an explicit generator, so runs are reproducible.
        bound = 1.0 / math.sqrt(in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device))
        with torch.no_grad():
            self.register_buffer("base", inner(weight).detach().clone(), persistent=False)

    @property
    def enabled(self) -> bool:
        return getattr(self.inner, "enabled", True)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if hasattr(self.inner, "enabled"):
            self.inner.enabled = value

    def delta(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A * self.scaling

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        base = self.base if self.enabled else w
        return base + self.delta().to(base.dtype)


def add_lowrank(linear: QuantLinear, rank: int, alpha: float, generator: torch.Generator) -> LowRankWeight:
    linear.weight.requires_grad_(False)
    if linear.bias is not None:
        linear.bias.requires_grad_(False)
    linear.weight_quant = LowRankWeight(linear.weight_quant, linear.weight, rank, alpha, generator)
    return linear.weight_quant


@torch.no_grad()
def merge_lowrank(linear: QuantLinear) -> None:
    """W <- W + s * B @ A and restore the plain weight quantizer (``freeze()`` quantizes the sum)."""
    lowrank = linear.weight_quant
    if not isinstance(lowrank, LowRankWeight):
        return
    linear.weight.data += lowrank.delta().to(linear.weight.dtype)
    linear.weight_quant = lowrank.inner


class NormWithBias(nn.Module):
    """RMSNorm output + a learnable bias (the official final-norm tune), for training only."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.bias = nn.Parameter(torch.zeros_like(norm.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + self.bias


def fold_bias_into_head(head: nn.Linear, bias: torch.Tensor) -> None:
    """lm_head(y + b) = lm_head(y) + W b: give the FP head the bias (it may share W with the embedding)."""
    extra = F.linear(bias.to(head.weight.dtype), head.weight)
    if head.bias is None:
        head.bias = nn.Parameter(extra.detach().clone(), requires_grad=False)
    else:
        head.bias.data += extra
