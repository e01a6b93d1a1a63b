"""Example plugin: RTN whose weight range is shrunk by a fixed ratio, and a baseline of its own.

- ``clipped-rtn``: RTN whose weight range is shrunk by a fixed ratio before rounding;
- ``fp32-reference``: a baseline (``is_baseline``): the unquantized model computed in float32 whatever
  the sweep's dtype. A sweep that lists it uses it as its reference instead of the built-in ``fp``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness import BitSpec, ConfigError, Method, MethodConfig, QuantContext, QuantizeResult, freeze, option, quantize_linears, \
    quantize_weight


@dataclass(frozen=True)
class ClippedRTNConfig(MethodConfig):
    """The plugin's one option; ``option`` gives it the line ``ptqbench methods --options`` prints."""

    clip_ratio: float = option(0.9, "fraction of the min/max range kept, in (0, 1]")

    def __post_init__(self) -> None:
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ConfigError(f"clip_ratio: {self.clip_ratio} is not allowed; use a number in (0, 1]")


class _ClippedQuantizer(nn.Module):
    def __init__(self, spec: BitSpec, ratio: float) -> None:
        super().__init__()
        self.spec, self.ratio = spec, torch.tensor(ratio)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return quantize_weight(w, self.spec, clip_min=self.ratio, clip_max=self.ratio)


class ClippedRTN(Method):
    name = "clipped-rtn"
    description = "Example plugin: RTN with a fixed clipping ratio"
    config_class = ClippedRTNConfig
    needs_calibration = False

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        for qlinear in quantize_linears(model, spec).values():
            qlinear.weight_quant = _ClippedQuantizer(spec, self.config.clip_ratio)
        freeze(model)
        return QuantizeResult(model, {"clip_ratio": self.config.clip_ratio})


@dataclass(frozen=True)
class FP32ReferenceConfig(MethodConfig):
    """No options."""


class FP32Reference(Method):
    name = "fp32-reference"
    description = "Example plugin baseline: the unquantized model in float32"
    config_class = FP32ReferenceConfig
    needs_calibration = False
    is_baseline = True

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        return QuantizeResult(model.float(), {"dtype": "float32"})
