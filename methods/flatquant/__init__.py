"""FlatQuant (Sun et al., arXiv 2410.09426) as a small package: the method, one block's transforms, the transforms.

- ``method.py``: the ``flatquant`` method (its options, and how it drives the block-wise engine);
- ``block.py``: one decoder block while it trains (its transforms, clips, quantizers) and the merge afterwards;
- ``transforms.py``: the learnable matrices and clips, and the online transform ``kronecker_affine``.

Importing the package registers the method (the registry imports ``methods.flatquant``) and the online transform.
"""
from methods.flatquant.method import FlatQuant, FlatQuantConfig

__all__ = ["FlatQuant", "FlatQuantConfig"]
