"""Optimisers the methods share beyond torch's own (``cayley``: SGD on the Stiefel manifold, for learned rotations)."""
