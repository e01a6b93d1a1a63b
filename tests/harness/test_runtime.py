"""harness.runtime: results that do not depend on the thread count."""
import torch

from harness.bits import BitSpec
from harness.quant.gptq import gptq_solve
from harness.runtime import thread_count_independent


def _hessian(columns: int = 576, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, columns, generator=g) * torch.rand(columns, generator=g) * 4
    return 2 * x.T @ x / 16


def _cholesky_at(threads: int, h: torch.Tensor, guarded: bool) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if guarded:
            with thread_count_independent(h):
                return torch.linalg.cholesky(h)
        return torch.linalg.cholesky(h)
    finally:
        torch.set_num_threads(before)


def test_lapack_cholesky_rounds_per_thread_count_and_the_guard_removes_it():
    """The premise (LAPACK's blocked Cholesky differs between 1 and 2 threads) and the guard's effect, on one matrix."""
    h = _hessian()
    assert not torch.equal(_cholesky_at(1, h, guarded=False), _cholesky_at(2, h, guarded=False))
    assert torch.equal(_cholesky_at(1, h, guarded=True), _cholesky_at(2, h, guarded=True))
    assert torch.get_num_threads() >= 1


def test_the_guard_restores_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with thread_count_independent(torch.zeros(1)):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_gptq_solve_is_bit_identical_at_one_and_two_threads():
    """Weights, grid and loss; the loss (sum of (w - q)^2 / d^2 over H^-1's diagonal d) tells apart inverse Hessians
    whose difference flipped no rounding of this weight (without the guard: 12196804.5757 vs 12196804.6373)."""
    h = _hessian(seed=1)
    w = torch.randn(256, 576, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(gptq_solve(w, h, BitSpec.parse("W3A16")))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[0][:3], results[1][:3]):
        assert torch.equal(a, b)
    assert results[0][3] == results[1][3]


def test_random_orthogonal_is_bit_identical_at_one_and_two_threads():
    """QuaRot's random rotation and the Kronecker factor R_K: a QR, which LAPACK blocks per thread count."""
    from harness.quant.hadamard import random_orthogonal

    before = torch.get_num_threads()
    try:
        found = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            found.append(random_orthogonal(576, seed=0))
            g = torch.randn(576, 576, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            found.append(torch.linalg.qr(g)[0])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(found[0], found[2])
    assert not torch.equal(found[1], found[3])  # the unguarded QR does differ: the guard is what makes them equal
