"""The quantized modules methods build: quantizers, QuantLinear, quantized attention inputs,
QLLM's channel reassembly wrappers.
"""
