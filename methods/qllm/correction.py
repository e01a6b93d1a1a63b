"""QLLM efficient error correction: low-rank weight corrections trained block-wise, then merged.

Official code (ModelTC/QLLM ``quantize/int_linear_lora.py``, ``quantize/qllm.py``): every linear of
the block gets A (r, in) Kaiming-uniform(a=sqrt(5)) and B (out, r) zero with scaling alpha / r;
while training the layer computes ``F.linear(Q(x), Q(W) + B @ A * s)`` with W frozen (here as
``Q(W) Q(x) + s B (A Q(x))``, the same product in a cheaper order: see ``LowRank``). AdamW
(weight decay 0) with a linear learning-rate decay trains A, B (and, official default, the blocks'
RMSNorm weights) on MSE(student on quantized inputs, teacher on FP inputs). After training
``W <- W + s * B @ A``, which the layer's weight quantizer then rounds: inference is a plain
quantized linear. Then the final RMSNorm is tuned on the last block's outputs, by default with an
added bias (the official ``LearnableLlamaRMSNorm``); here that bias is folded into an ``lm_head``
bias, which is exact because lm_head is linear and kept in full precision.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness import QuantLinear
from harness.quant.quantizer import WeightQuantizer, dequantize_codes, weight_codes


class CachedWeight(nn.Module):
    """A ``QuantLinear.weight_quant`` that returns Q(W) computed once: W is frozen while the correction trains.

    ``compact`` (QLLM's ``low_memory``) keeps Q(W) of a plain min/max weight quantizer as its integer
    codes with per-row scale and zero point (``harness.quant.quantizer.weight_codes``), dequantized on each
    call: bit for bit the same weight, for 1 byte per weight instead of 4; with the layer's
    ``recompute_weight`` the dequantized weight is dropped after the forward and made again for the
    backward, so a job of four blocks holds a quarter of their float32 size in Q(W) instead of all
    of it (on LLaMA-2-70B about 10 GB less). Otherwise, or for any other weight quantizer, Q(W) is
    cached as a float tensor.
    """

    def __init__(self, inner: nn.Module, weight: torch.Tensor, compact: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.shape = weight.shape
        with torch.no_grad():
            usable = compact and isinstance(inner, WeightQuantizer) and inner.enabled
            packed = weight_codes(weight, inner.spec) if usable else None
            if packed is None:
                self.register_buffer("base", inner(weight).detach().clone(), persistent=False)
            else:
                for name, tensor in zip(("codes", "scale", "zero"), packed):
                    self.register_buffer(name, tensor.detach().clone(), persistent=False)
        self.compact = packed is not None

    @property
    def enabled(self) -> bool:
        return getattr(self.inner, "enabled", True)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if hasattr(self.inner, "enabled"):
            self.inner.enabled = value

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return dequantize_codes(self.codes, self.scale, self.zero, self.shape) if self.compact else self.base


class LowRank(nn.Module):
    """s * B (A x): the correction as a side path of the layer (``QuantLinear.side``).

    The official layer computes ``F.linear(Q(x), Q(W) + B @ A * s)``; this is the same product taken
    in another order, so each step costs O(tokens * (in + out) * r) instead of forming B @ A and the
    weight-sized gradient of Q(W) + B @ A * s (which was most of QLLM's training memory and time:
    four blocks' worth of weight copies per job). Results differ from the official order only by
    float rounding.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, generator: torch.Generator,
                 device: torch.device) -> None:
        super().__init__()
        self.scaling = alpha / rank
        a = torch.empty(rank, in_features)
        # nn.init.kaiming_uniform_(a=sqrt(5)) with an explicit generator, so runs are reproducible.
        bound = 1.0 / math.sqrt(in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))

    def delta(self) -> torch.Tensor:
        """The weight-shaped correction s * B @ A (for the merge)."""
        return self.lora_B @ self.lora_A * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling


def add_lowrank(linear: QuantLinear, rank: int, alpha: float, generator: torch.Generator, low_memory: bool = False) -> LowRank:
    """Freeze the layer's weight at Q(W) and give it a trainable low-rank side path; return the path.

    ``low_memory``: Q(W) as integer codes, dequantized in the forward and again in the backward (see
    :class:`CachedWeight`)."""
    linear.weight.requires_grad_(False)
    if linear.bias is not None:
        linear.bias.requires_grad_(False)
    linear.weight_quant = CachedWeight(linear.weight_quant, linear.weight, compact=low_memory)
    linear.recompute_weight = low_memory
    linear.side = LowRank(linear.out_features, linear.in_features, rank, alpha, generator, linear.weight.device)
    return linear.side


@contextlib.contextmanager
def weights_offloaded(linears: list[QuantLinear], scratch: Path | None = None) -> Iterator[Callable[[QuantLinear], None]]:
    """The linears' weights W out of memory for the ``with`` body (QLLM's ``low_memory``), back bit for bit.

    While the corrections train, each linear computes with its cached Q(W) (:class:`CachedWeight`)
    and W is needed again only for the merge, W + s B A: on the scale benchmark a 4-block job's W is
    0.8 GB of float32 that no training step reads. Weights on a GPU wait in host memory; weights in
    host memory wait in ``scratch`` (the run's work directory; None = the system's temporary
    directory), so the page cache holds them, not the process. One raw file per weight, written
    from and read into the tensor's own bytes: a safetensors file would be mapped whole while it
    is read, and its pages would count in the process's memory beside the copies read from it.

    The body gets ``restore(linear)``, to bring one weight back right before its merge (so the
    weights come back while the codes go, not all of them on top of the codes); the rest come
    back when the body ends, however it ends.
    """
    import numpy as np

    folder = tempfile.TemporaryDirectory(prefix="ptqbench-qllm-weights-", dir=scratch)
    saved: dict[int, tuple[torch.Tensor | Path, torch.Size, torch.dtype, torch.device]] = {}

    def restore(linear: QuantLinear) -> None:
        if id(linear) not in saved:
            return
        where, shape, dtype, home = saved.pop(id(linear))
        if isinstance(where, Path):
            where = torch.from_numpy(np.fromfile(where, dtype=np.uint8)).view(dtype).reshape(shape)
        linear.weight = nn.Parameter(where.to(home), requires_grad=False)

    try:
        for i, linear in enumerate(linears):
            w = linear.weight.detach()
            if w.device.type == "cpu":
                where: torch.Tensor | Path = Path(folder.name) / f"{i}.bin"
                w.contiguous().view(torch.uint8).numpy().tofile(where)
            else:
                where = w.to("cpu")
            saved[id(linear)] = (where, w.shape, w.dtype, w.device)
            linear.weight = nn.Parameter(w.to("meta"), requires_grad=False)
        yield restore
    finally:
        for linear in linears:
            restore(linear)
        folder.cleanup()


@torch.no_grad()
def merge_lowrank(linear: QuantLinear) -> None:
    """W <- W + s * B @ A and restore the plain weight quantizer (``freeze()`` quantizes the sum)."""
    lowrank = linear.side
    if not isinstance(lowrank, LowRank):
        return
    linear.weight.data += lowrank.delta().to(linear.weight.dtype)
    linear.weight_quant = linear.weight_quant.inner
    linear.side = None
    linear.recompute_weight = False


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
