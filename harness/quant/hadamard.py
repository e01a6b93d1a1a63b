"""Hadamard matrices of the orders LLaMA-family widths need, and the fast transform with them.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal:
rotating by it spreads every outlier channel over all channels (QuaRot, QuIP#). Sylvester's
construction gives every power of two; the other widths of LLaMA-family models are a power of two
times one of the base orders 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172 (LLaMA-2-7B's MLP
11008 = 172 x 64, LLaMA-2-70B's 28672 = 28 x 1024, smollm2-135m's hidden 576 = 36 x 16 and MLP
1536 = 12 x 128). The base matrices are data (``hadamard_bases.txt``): the ones QuaRot's
``fake_quant/hadamard_utils.py`` (spcl/QuaRot 5008669) and QuIP# use, from N. J. A. Sloane's library
of Hadamard matrices (Paley constructions for 12, 20, 28, 36, 40, 60, 108, 140; Williamson for
52, 156, 172), one line per order, one hex number per row, bit 1 = +1, most significant bit first.
With the same base matrices and the same order of preference, every rotation here equals the
official code's for the same random signs.

Conventions, as the official ``matmul_hadU``: ``hadamard_transform(x) = x @ hadamard_matrix(n).T``
with ``hadamard_matrix(n) = (B_K kron S_m) / sqrt(n)``, B_K the base of order K and S_m Sylvester's
of order m = n / K.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from harness.errors import ConfigError

BASES_FILE = Path(__file__).with_name("hadamard_bases.txt")
# The official order of preference (hadamard_utils.get_hadK): the first base K with n = K x 2^j.
BASE_ORDERS = (172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12)


@functools.cache
def _bases() -> dict[int, tuple[str, ...]]:
    bases = {}
    for line in BASES_FILE.read_text().splitlines():
        order, *rows = line.split()
        bases[int(order)] = tuple(rows)
    return bases


@functools.cache
def base_matrix(order: int) -> torch.Tensor:
    """The stored +-1 base matrix of ``order`` (one of ``BASE_ORDERS``), float64."""
    rows = _bases()[order]
    width = len(rows[0]) * 4
    bits = [[int(b) for b in f"{int(r, 16):0{width}b}"[:order]] for r in rows]
    return torch.tensor(bits, dtype=torch.float64) * 2 - 1


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def factor(n: int) -> tuple[int, int]:
    """(K, m) with n = K x m, m a power of two and K = 1 or a base order (the official choice); else a one-line error."""
    if is_power_of_two(n):
        return 1, n
    for k in BASE_ORDERS:
        if n % k == 0 and is_power_of_two(n // k):
            return k, n // k
    raise ConfigError(f"no Hadamard matrix of order {n}: ptqbench builds 2^j and K x 2^j for K in "
                      f"{', '.join(map(str, sorted(BASE_ORDERS)))}")


def sylvester(m: int) -> torch.Tensor:
    """Sylvester's +-1 Hadamard matrix of order m (a power of two), float64: H_2m = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal (B_K kron S_m) / sqrt(n) (module docstring)."""
    k, m = factor(n)
    h = sylvester(m) if k == 1 else torch.kron(base_matrix(k), sylvester(m))
    return (h / math.sqrt(n)).to(dtype)


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ S_m along the last dimension (m a power of two), unnormalised: the butterfly, O(m log m) adds."""
    m = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < m:
        y = x.reshape(*lead, m // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, m)


def hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ hadamard_matrix(n).T`` along the last dimension (``transpose``: ``x @ hadamard_matrix(n)``, the
    inverse), without forming the n x n matrix.

    The Sylvester part is a butterfly (O(n log n)); the base part one small matmul, as the official
    ``matmul_hadU_cuda``: x viewed as (..., K, m), transformed along m, then multiplied by B_K on the left.
    """
    n = x.shape[-1]
    k, m = factor(n)
    y = walsh_hadamard(x.reshape(*x.shape[:-1], k, m))
    if k > 1:
        base = base_matrix(k).to(y)
        y = (base.T if transpose else base) @ y
    return y.reshape(x.shape) / math.sqrt(n)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's randomized Hadamard rotation: diag(s) hadamard_matrix(n)^T with random signs s.

    The signs are ``torch.randint(0, 2, (n,))`` of a CPU generator seeded with ``seed``: the draw the
    official ``random_hadamard_matrix`` makes when it is the first after ``torch.manual_seed(seed)``.
    """
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).to(torch.float64) * 2 - 1
    return (signs[:, None] * hadamard_matrix(n).T).to(dtype)
