"""ptqbench's shared machinery: what every quantization method builds on.

The public surface, in the order data flows through a run::

    effective_spec(method, "W4A4")            # harness.scheme: the bit spec with the sweep's quant scheme
    load_model("smollm2-135m")                # harness.models
    calibration_windows("brown", tok, ...)    # harness.data.windows
    get_method("rtn").from_options({})        # harness.registry / harness.method
      .apply(model, spec, calib, ctx)         #   checks, then quantize(): quantize_linears, adapters, BlockHooks
    perplexity(model, windows, device=...)    # harness.evaluation.evaluate
"""
from __future__ import annotations

from harness.adapter import LlamaAdapter, ScalePair, get_adapter
from harness.bits import FP, BitSpec
from harness.errors import ConfigError, PtqbenchError, ResourceUnavailableError, UnknownNameError
from harness.engine.hooks import BlockHooks, BlockJob
from harness.method import Method, MethodConfig, QuantContext, QuantizeResult, WorkingMemory, keyed_when_set, option
from harness.quant.qlinear import QuantLinear, freeze, quant_linears, quantize_block, quantize_linears, quantizers_disabled
from harness.quant.quantizer import ActQuantizer, WeightQuantizer, fake_quantize, quantize_activation, quantize_weight, round_ste
from harness.registry import REGISTRY, get_method, register_method

__version__ = "0.1.0"

__all__ = [
    "FP", "ActQuantizer", "BitSpec", "BlockHooks", "BlockJob", "WorkingMemory", "ConfigError", "LlamaAdapter", "Method", "MethodConfig", "PtqbenchError",
    "QuantContext", "QuantLinear", "QuantizeResult", "REGISTRY", "ResourceUnavailableError", "ScalePair",
    "UnknownNameError", "WeightQuantizer", "fake_quantize", "freeze", "get_adapter", "get_method", "keyed_when_set", "option",
    "quant_linears", "quantize_activation", "quantize_block", "quantize_linears", "quantize_weight", "quantizers_disabled",
    "register_method", "round_ste",
]
