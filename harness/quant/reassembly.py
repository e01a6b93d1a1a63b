"""Channel reassembly at inference: an index/scale rewrite of a linear's input channels (QLLM's CD/CA).

``Reassembly`` maps a width-C input to width C' by x'[group[e]] += x[src[e]] * scale[e] for every
expanded channel e, then divides by the number of channels that landed in each output channel
(``count``). ``Reassembled`` puts one in front of a module's input or behind its output. They live
in ``harness`` (the search that builds them is ``methods/qllm``) so that ``harness.export.formats`` can
save and rebuild a reassembled model without importing a method.
"""
from __future__ import annotations

import torch
from torch import nn


class Reassembly(nn.Module):
    """Applies a reassembly plan to an input (index / scale buffers, no parameters).

    An explicit module because assembly averages two different channels, which no per-channel
    scale of the producer (RMSNorm weight, up_proj rows) can express; disassembly alone could be
    folded, but one mechanism for every site keeps both exact.
    """

    def __init__(self, src: torch.Tensor, scale: torch.Tensor, group: torch.Tensor, count: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("src", src.clone())
        self.register_buffer("scale", scale.clone())
        self.register_buffer("group", group.clone())
        self.register_buffer("count", count.clone())
        self.merged = src.numel() - count.numel()  # each merged pair removes one channel of the expanded width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expanded = x.index_select(-1, self.src) * self.scale.to(x.dtype)
        if self.merged == 0:
            return expanded
        out = x.new_zeros(*x.shape[:-1], self.count.numel()).index_add_(-1, self.group, expanded)
        return out / self.count.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={int(self.src.max()) + 1}, expanded={self.src.numel()}, out={self.count.numel()}, merged={self.merged}"


class Reassembled(nn.Module):
    """``module`` followed (``after=True``) or preceded by a :class:`Reassembly` of its output / input."""

    def __init__(self, module: nn.Module, reassembly: Reassembly, after: bool) -> None:
        super().__init__()
        self.module, self.reassembly, self.after = module, reassembly, after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reassembly(self.module(x)) if self.after else self.module(self.reassembly(x))
