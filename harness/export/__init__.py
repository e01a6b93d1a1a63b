"""Quantized models that leave ptqbench: compressed-tensors or ptqbench's format, from a model
in memory or from a stored run.
"""
