"""Round-to-nearest (RTN): min/max quantization of every decoder linear, no calibration.

The weakest baseline of every PTQ paper. Weights get the spec's static quantizer (per channel,
group or tensor) and activations the dynamic per-token quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness import BitSpec, Method, MethodConfig, QuantContext, QuantizeResult, freeze, quantize_linears, register_method


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """RTN has no options: the bit spec says everything."""


@register_method
class RTN(Method):
    name = "rtn"
    description = "Round-to-nearest min/max quantization, no calibration data"
    config_class = RTNConfig
    needs_calibration = False

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        swapped = quantize_linears(model, spec)
        freeze(model)
        return QuantizeResult(model, {"quantized_linears": len(swapped)})
