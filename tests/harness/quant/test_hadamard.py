"""Hadamard matrices and the fast transform: orthogonality, the official transform, the official choice of base; R_K ⊗ H_m
for widths without a Hadamard matrix against the dense product built from its definition."""
from __future__ import annotations

import math

import pytest
import torch

from harness.errors import ConfigError
from harness.quant import hadamard as had


def official_matmul_hadU(x: torch.Tensor, base: torch.Tensor | None, k: int) -> torch.Tensor:
    """Transcription of QuaRot's fake_quant/hadamard_utils.py matmul_hadU (the CPU butterfly), its base passed in."""
    n = x.shape[-1]
    inp = x.clone().view(-1, n, 1)
    out = inp.clone()
    while inp.shape[1] > k:
        inp = inp.view(inp.shape[0], inp.shape[1] // 2, 2, inp.shape[2])
        out = out.view(inp.shape)
        out[:, :, 0, :] = inp[:, :, 0, :] + inp[:, :, 1, :]
        out[:, :, 1, :] = inp[:, :, 0, :] - inp[:, :, 1, :]
        out = out.view(inp.shape[0], inp.shape[1], -1)
        inp, out = out, inp
    if k > 1:
        inp = base.view(1, k, k).to(inp) @ inp
    return inp.view(x.shape) / torch.tensor(n).sqrt()


@pytest.mark.parametrize("order", had.BASE_ORDERS)
def test_every_stored_base_is_a_hadamard_matrix(order):
    h = had.base_matrix(order)
    assert h.shape == (order, order) and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.float64))


def test_sylvester_is_the_popcount_formula():
    m = 64
    i = torch.arange(m)
    popcount = torch.tensor([[(int(a) & int(b)).bit_count() for b in i] for a in i])
    assert torch.equal(had.sylvester(m), (-1.0) ** popcount.double())


@pytest.mark.parametrize("n, k", [(576, 36), (1536, 12), (4096, 1), (11008, 172), (28672, 28), (5120, 40), (13824, 108),
                                  (6656, 52), (17920, 140), (22016, 172), (9984, 156), (7680, 60), (10240, 40)])
def test_llama_widths_factor_as_the_official_get_hadK(n, k):
    assert had.factor(n) == (k, n // k)


def test_a_width_without_construction_is_one_line():
    with pytest.raises(ConfigError, match=r"^no Hadamard matrix of order 5632: ptqbench builds 2\^j and K x 2\^j for K in 12, "):
        had.factor(5632)  # 11 x 512 (TinyLlama's MLP): no base of order 11 x 2^j


@pytest.mark.parametrize("n", [2, 12, 96, 576, 1536])
def test_matrix_is_orthogonal_and_the_transform_applies_it(n):
    h = had.hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(had.hadamard_transform(x), x @ h.T, atol=1e-12)


@pytest.mark.parametrize("n", [64, 96, 576, 1536, 11008])
def test_transform_equals_the_official_butterfly(n):
    k, _ = had.factor(n)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    official = official_matmul_hadU(x, had.base_matrix(k) if k > 1 else None, k)
    assert torch.allclose(had.hadamard_transform(x), official, atol=1e-12)
    assert had.hadamard_transform(x).norm() == pytest.approx(x.norm().item(), rel=1e-12)  # a rotation


def test_random_hadamard_is_orthogonal_seeded_and_the_official_draw():
    n, seed = 576, 3
    q = had.random_hadamard(n, seed)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, had.random_hadamard(n, seed)) and not torch.equal(q, had.random_hadamard(n, seed + 1))
    torch.manual_seed(seed)  # official: utils.set_seed(seed), then random_hadamard_matrix's draw is the first
    signs = torch.diag(torch.randint(low=0, high=2, size=(n,)).to(torch.float64) * 2 - 1)
    k, _ = had.factor(n)
    assert torch.allclose(q, official_matmul_hadU(signs, had.base_matrix(k), k), atol=1e-12)
    assert abs(q).max().item() == pytest.approx(1 / math.sqrt(n))


def dense_kronecker(n: int, seed: int) -> torch.Tensor:
    """R_K kron H_m / sqrt(m) built from the definitions: R_K the signed Q of the QR of a seeded Gaussian matrix,
    H_m Sylvester's matrix from the popcount formula, the Kronecker product written out entry by entry."""
    m = n & -n
    k = n // m
    q, r = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    rk = q * torch.sign(torch.diag(r))
    i = torch.arange(m)
    both = i[:, None] & i[None, :]
    popcount = sum((both >> bit) & 1 for bit in range(max(m.bit_length(), 1)))
    h = (-1.0) ** popcount.double() / math.sqrt(m)
    return rk[:, None, :, None].mul(h[None, :, None, :]).reshape(n, n)  # [(i, a), (j, b)] = R[i, j] H[a, b]


@pytest.mark.parametrize("n, k", [(4864, 19), (5632, 11), (1216, 19), (88, 11), (22, 11), (3, 3)])
def test_widths_without_a_hadamard_split_off_the_largest_power_of_two(n, k):
    assert not had.has_hadamard(n)
    assert had.kronecker_factor(n) == (k, n // k) and k % 2 == 1


@pytest.mark.parametrize("n", [1216, 88, 176])
def test_kronecker_transform_is_x_times_the_dense_product_and_orthogonal(n):
    seed = 5
    dense = dense_kronecker(n, seed)
    assert torch.allclose(had.kronecker_matrix(n, seed), dense, atol=1e-12)
    assert torch.allclose(dense @ dense.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(had.kronecker_transform(x, seed), x @ dense, atol=1e-12)
    assert torch.allclose(had.kronecker_transform(x, seed, transpose=True), x @ dense.T, atol=1e-12)
    assert had.kronecker_transform(x, seed).norm() == pytest.approx(x.norm().item(), rel=1e-12)
    assert not torch.allclose(had.kronecker_transform(x, seed + 1), x @ dense, atol=1e-3)  # the seed draws R_K


def test_the_rotation_of_a_width_is_its_hadamard_where_the_table_has_one_else_the_kronecker_product():
    x = torch.randn(4, 1536, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(had.rotation_transform(x, seed=7), had.hadamard_transform(x))
    assert torch.equal(had.rotation_matrix(1536, seed=7), had.hadamard_matrix(1536).T)
    assert torch.allclose(had.rotation_matrix(4864, seed=7), dense_kronecker(4864, 7), atol=1e-12)
    assert (had.rotation_name(4864, 7), had.rotation_cost(4864)) == ("R_19 (seed 7) ⊗ H_256", "19 + 8 MACs per element")
    assert (had.rotation_name(1536, 7), had.rotation_cost(1536)) == ("H_1536 (12 x 128)", "12 + 7 MACs per element")
    assert (had.rotation_name(64, 7), had.rotation_cost(64)) == ("H_64", "6 additions per element")


def test_random_hadamard_of_a_width_without_one_is_the_signed_kronecker_product():
    n, seed = 88, 3
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    q = had.random_hadamard(n, seed)
    assert torch.allclose(q, signs[:, None] * dense_kronecker(n, seed), atol=1e-12)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def _stacked_butterfly(x: torch.Tensor) -> torch.Tensor:
    """x @ S_m written as new tensors per stage (the plain form the fast transform must equal bit for bit)."""
    m, lead, h = x.shape[-1], x.shape[:-1], 1
    while h < m:
        y = x.reshape(*lead, m // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, m)


def _plain_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    n = x.shape[-1]
    k, m = had.factor(n)
    y = _stacked_butterfly(x.reshape(*x.shape[:-1], k, m))
    if k > 1:
        base = had.base_matrix(k).to(y)
        y = (base.T if transpose else base) @ y
    return y.reshape(x.shape) / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 64, 96, 576, 1536])
def test_the_fast_transform_is_the_plain_one_bit_for_bit(n, dtype):
    """The blocked butterfly (evaluation) and the stacked one (autograd) give the plain form's values bit for bit, in
    the same layout, on contiguous inputs whose rows make blocks of every size and on transposed ones (Q and K after
    RoPE: blocks of their tokens), and never write the input."""
    x = torch.randn(2, 5, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)).to(dtype)
    rows = torch.randn(128, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)).to(dtype)
    after_rope = torch.randn(1, 64, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    after_rope = after_rope.transpose(1, 2)  # (batch, heads, tokens, head_dim) over (batch, tokens, heads) memory
    for inp in (x, x.transpose(1, 2), rows, rows[:72], rows[:3], after_rope):  # blocks of 64, 8, 1; split tokens
        before = inp.clone()
        for transpose in (False, True):
            plain, fast = _plain_transform(inp, transpose), had.hadamard_transform(inp, transpose)
            assert torch.equal(fast, plain)
            assert fast.stride() == plain.stride() or n == 1  # the layout too, SDPA rounds by it (width 1: a division)
            with torch.enable_grad():
                trained = had.hadamard_transform(inp.clone().requires_grad_(), transpose)
            assert trained.grad_fn is not None and torch.equal(trained.detach(), plain)
        assert torch.equal(inp, before)
    m = n & -n
    assert torch.equal(had.walsh_hadamard(x[..., :m]), _stacked_butterfly(x[..., :m]))
    assert had.walsh_hadamard(x[..., :m]).data_ptr() != x.data_ptr()


def test_the_kronecker_transform_evaluates_as_it_trains():
    x = torch.randn(3, 7, 88, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        trained = had.kronecker_transform(x.clone().requires_grad_(), seed=2)
    assert torch.equal(had.kronecker_transform(x, seed=2), trained.detach())
