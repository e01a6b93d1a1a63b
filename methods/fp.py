"""The full-precision baseline: the model as loaded (FP16 on CUDA, FP32 on CPU), no quantizer."""
from __future__ import annotations

from dataclasses import dataclass

from harness import BitSpec, Method, MethodConfig, QuantContext, QuantizeResult, register_method


@dataclass(frozen=True)
class FPConfig(MethodConfig):
    """The baseline has no options."""


@register_method
class FP(Method):
    name = "fp"
    description = "Full-precision baseline (no quantization); the reference of every sweep that lists no other baseline"
    config_class = FPConfig
    needs_calibration = False
    is_baseline = True
    seeded = False

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        return QuantizeResult(model, {})
