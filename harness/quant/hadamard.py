"""Hadamard matrices of the orders LLaMA-family widths need, the fast transform with them, and R_K ⊗ H_m for the rest.

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

**Widths without a Hadamard matrix** (Qwen2.5-0.5B's MLP 4864 = 19 x 256, TinyLlama's 5632 = 11 x 512):
``kronecker_matrix(n, seed) = R_K kron (S_m / sqrt(m))`` with m the largest power of two dividing n, K = n / m
(odd, as small as it can be) and R_K a seeded random orthogonal K x K matrix (``random_orthogonal``). It is
orthogonal, and applied as fast as a Hadamard of a base order: x viewed as (..., K, m), the butterfly along m,
one K x K matmul along K, i.e. K multiply-adds and log2 m additions per element (19 + 8 for 4864; 12 + 7 for
the Hadamard of 1536 = 12 x 128). It spreads an outlier evenly over the m channels of its Walsh-Hadamard
block and, through R_K, over the K blocks with random weights (a Hadamard spreads it evenly over all n). ``rotation_matrix(n, seed)``
and ``rotation_transform(x, seed)`` are QuaRot's rotation of any width: the Hadamard where the table has one
(the seed unused), the Kronecker product otherwise; ``rotation_name(n, seed)`` says which and
``rotation_cost(n)`` what it costs online.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from harness.errors import ConfigError
from harness.runtime import thread_count_independent

BASES_FILE = Path(__file__).with_name("hadamard_bases.txt")
# The official order of preference (hadamard_utils.get_hadK): the first base K with n = K x 2^j.
BASE_ORDERS = (172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12)
# Row blocks of the butterfly in evaluation (``walsh_hadamard``), largest first.
BLOCKS = (64, 32, 16, 8)


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


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """The official ``random_orthogonal_matrix``: Q of the QR of a Gaussian matrix, columns signed by diag(R), float64."""
    g = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with thread_count_independent(g):  # LAPACK's blocked QR rounds differently per thread count
        q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diag(r)).unsqueeze(0)


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


@functools.cache
def has_hadamard(n: int) -> bool:
    """Whether ``factor`` builds a Hadamard matrix of order n."""
    try:
        factor(n)
    except ConfigError:
        return False
    return True


def kronecker_factor(n: int) -> tuple[int, int]:
    """(K, m) with n = K x m, m the largest power of two dividing n (K odd; 1 for a power of two)."""
    if n <= 0:
        raise ConfigError(f"no rotation of width {n}: a width is a positive integer")
    m = n & -n
    return n // m, m


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
    """x @ S_m along the last dimension (m a power of two), unnormalised: the butterfly, O(m log m) adds; a new
    contiguous tensor.

    Stage h pairs the elements h apart within blocks of 2h, (a, b) -> (a + b, a - b), for h = 1, 2, 4, ... in
    this order (the order of the additions decides the rounding). With autograd (a transform trained through)
    each stage stacks new tensors. Without it (evaluation) the same additions run faster, so the values are the
    same bit for bit: the rows are taken in blocks of B (64 where their count allows, ``_blocked``) and every
    stage but the last writes its sums and differences into a buffer laid out (m, B), so the next stage's
    operands are runs of h x B contiguous values instead of runs of h (a few elements for the first stages,
    which the elementwise kernels cannot vectorize). The first stage reads the input in place (never writing it)
    and the last writes the result in the standard layout (the stacked form's, which SDPA's rounding depends
    on), so regrouping costs no pass of its own; between them two buffers take turns.
    """
    m = x.shape[-1]
    lead = x.shape[:-1]
    if x.requires_grad and torch.is_grad_enabled():
        h = 1
        while h < m:
            y = x.reshape(*lead, m // (2 * h), 2, h)
            x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
            h *= 2
        return x.reshape(*lead, m) if m > 1 else x.clone()
    result = torch.empty(*lead, m, dtype=x.dtype, device=x.device)
    if m == 1:
        return result.copy_(x)
    src = _blocked(x).transpose(-1, -2)  # (..., m, B) views: the input's and the result's
    last = _blocked(result).transpose(-1, -2)
    buffers = [torch.empty(src.shape, dtype=x.dtype, device=x.device) for _ in range(2 if m > 4 else 1)]
    h = 1
    while h < m:
        dst = last if 2 * h == m else buffers[0]
        y, out = (t.unflatten(-2, (m // (2 * h), 2, h)) for t in (src, dst))  # (..., m / 2h, 2, h, B)
        torch.add(y[..., 0, :, :], y[..., 1, :, :], out=out[..., 0, :, :])
        torch.sub(y[..., 0, :, :], y[..., 1, :, :], out=out[..., 1, :, :])
        src = dst
        buffers.reverse()
        h *= 2
    return result


def _blocked(x: torch.Tensor) -> torch.Tensor:
    """x's rows grouped in blocks of B (..., B, m): its last leading dimension split where B divides it (a view,
    whatever the layout: Q and K after RoPE are transposed), else all rows flattened (a view where x is contiguous,
    a copy otherwise). Depends on the shape alone, so a result of the same shape is grouped alike."""
    m, lead = x.shape[-1], x.shape[:-1]
    last = lead[-1] if lead else 1
    block = next((b for b in BLOCKS if last % b == 0), 0)
    if block:
        return x.reshape(*lead[:-1], last // block, block, m)
    rows = math.prod(lead)
    return x.reshape(-1, next((b for b in BLOCKS if rows % b == 0), 1), m)


def hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ hadamard_matrix(n).T`` along the last dimension (``transpose``: ``x @ hadamard_matrix(n)``, the
    inverse), without forming the n x n matrix.

    The Sylvester part is a butterfly (O(n log n)); the base part one small matmul, as the official
    ``matmul_hadU_cuda``: x viewed as (..., K, m), transformed along m, then multiplied by B_K on the left.
    """
    n = x.shape[-1]
    k, m = factor(n)
    y = walsh_hadamard(x.reshape(*x.shape[:-1], k, m) if k > 1 else x)
    if k > 1:
        base = _base_operand(k, y.device, y.dtype)
        y = (base.T if transpose else base) @ y
    return y.reshape(x.shape).div_(math.sqrt(n))


@functools.lru_cache(maxsize=16)
def _base_operand(k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return base_matrix(k).to(device, dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n signs +-1, float64: ``torch.randint(0, 2, (n,))`` of a CPU generator seeded with ``seed``, the draw the
    official ``random_hadamard_matrix`` makes when it is the first after ``torch.manual_seed(seed)``."""
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's randomized Hadamard rotation: diag(s) hadamard_matrix(n)^T with random signs s (``random_signs``);
    for a width without a Hadamard matrix, diag(s) kronecker_matrix(n, seed) (``rotation_matrix``)."""
    return (random_signs(n, seed)[:, None] * rotation_matrix(n, seed)).to(dtype)


def kronecker_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal R_K kron (S_m / sqrt(m)) of ``kronecker_factor(n)``, R_K = ``random_orthogonal(K, seed)``."""
    k, m = kronecker_factor(n)
    return torch.kron(random_orthogonal(k, seed).contiguous(), sylvester(m) / math.sqrt(m)).to(dtype)


@functools.lru_cache(maxsize=16)
def _orthogonal_operand(k: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return random_orthogonal(k, seed).to(device, dtype)


def kronecker_transform(x: torch.Tensor, seed: int, transpose: bool = False) -> torch.Tensor:
    """``x @ kronecker_matrix(n, seed)`` along the last dimension (``transpose``: ``x @ kronecker_matrix(n, seed).T``,
    the inverse), without forming the n x n matrix: with x viewed as X of shape (..., K, m), x (R kron S) is
    R^T X S, so the butterfly runs along m and R^T (R for the inverse) multiplies on the left."""
    n = x.shape[-1]
    k, m = kronecker_factor(n)
    y = walsh_hadamard(x.reshape(*x.shape[:-1], k, m) if k > 1 else x).div_(math.sqrt(m))
    if k > 1:
        r = _orthogonal_operand(k, seed, y.device, y.dtype)
        y = (r if transpose else r.T) @ y
    return y.reshape(x.shape)


def rotation_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's rotation M of width n, ``rotation_transform(x, seed) = x @ M``: ``hadamard_matrix(n).T`` where the
    table builds one (``seed`` unused), else ``kronecker_matrix(n, seed)``."""
    return hadamard_matrix(n, dtype).T if has_hadamard(n) else kronecker_matrix(n, seed, dtype)


def rotation_transform(x: torch.Tensor, seed: int, transpose: bool = False) -> torch.Tensor:
    """``x @ rotation_matrix(n, seed)`` along the last dimension (``transpose``: its inverse), fast."""
    if has_hadamard(x.shape[-1]):
        return hadamard_transform(x, transpose)
    return kronecker_transform(x, seed, transpose)


def rotation_name(n: int, seed: int) -> str:
    """Which matrix ``rotation_matrix(n, seed)`` is: ``H_64``, ``H_1536 (12 x 128)`` or ``R_19 (seed 0) ⊗ H_256``."""
    if has_hadamard(n):
        k, m = factor(n)
        return f"H_{n}" + (f" ({k} x {m})" if k > 1 else "")
    k, m = kronecker_factor(n)
    return f"R_{k} (seed {seed}) ⊗ H_{m}"


def rotation_cost(n: int) -> str:
    """What applying ``rotation_transform`` to a width n costs per element: K multiply-adds (the K x K matmul) and
    log2 m additions (the butterfly), ``19 + 8 MACs per element`` for 4864; log2 n additions for a power of two."""
    k, m = factor(n) if has_hadamard(n) else kronecker_factor(n)
    j = m.bit_length() - 1
    return f"{k} + {j} MACs per element" if k > 1 else f"{j} additions per element"
