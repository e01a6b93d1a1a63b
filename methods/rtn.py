"""Round-to-nearest (RTN): min/max quantization of every decoder linear, no calibration.

The weakest baseline of every PTQ paper. Weights get the spec's static quantizer (per channel,
group or tensor) and activations the dynamic per-token quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness import (
    BitSpec,
    Method,
    MethodConfig,
    QuantContext,
    QuantizeResult,
    freeze,
    get_adapter,
    quantize_block,
    register_method,
)
from harness.models.lazy import map_blocks


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """RTN has no options: the bit spec says everything."""


@register_method
class RTN(Method):
    name = "rtn"
    description = "Round-to-nearest min/max quantization, no calibration data"
    config_class = RTNConfig
    needs_calibration = False
    seeded = False

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        adapter, swapped = get_adapter(model), {}

        def quantize(i, layer) -> None:  # one block at a time: a lazy model holds one in memory
            swapped.update(quantize_block(layer, spec, adapter, prefix=f"{adapter.layers_path}.{i}."))
            freeze(layer)

        map_blocks(model, quantize)
        return QuantizeResult(model, {"quantized_linears": len(swapped)})
