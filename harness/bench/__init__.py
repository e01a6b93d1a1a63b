"""Benchmarks: quantized throughput, the engine's memory behaviour, and out-of-core scale.
"""
