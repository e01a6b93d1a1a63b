"""QLLM (Liu et al., arXiv 2310.08041) as a small package: the method and its two techniques.

- ``method.py``: the ``qllm`` method (its options, and how it drives the block-wise engine);
- ``reassembly.py``: adaptive channel reassembly (disassembly, assembly, the theta search);
- ``correction.py``: low-rank error correction and the final-norm tune.

Importing the package registers the method (the registry imports ``methods.qllm``).
"""
from methods.qllm.method import QLLM, QLLMConfig

__all__ = ["QLLM", "QLLMConfig"]
