"""harness.optim.cayley: one step is the official SGDG update (its fixed-point iteration run to convergence), the
iterates stay orthonormal, a gradient normal to the manifold does not move them, and the loss of a toy rotation
problem (find R with X R = X R*) goes down."""
from __future__ import annotations

import itertools

import pytest
import torch

from harness.optim.cayley import CayleySGD


def orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q.to(dtype)


def official_step(p: torch.Tensor, grad: torch.Tensor, lr: float, iterations: int) -> torch.Tensor:
    """facebookresearch/SpinQuant train_utils/optimizer.py, SGDG.step with stiefel=True and momentum 0, transcribed
    (rows normalised, V = -gᵀ, W = Ŵ - Ŵᵀ, the step capped at 1/‖W‖₁, Cayley_loop), with the loop's iteration count
    as a parameter and no random QR retraction."""
    x = p / p.norm(dim=1, keepdim=True).add(1e-8)
    v = -grad.t()
    mx = v @ x
    xmx = x @ mx
    xxmx = x.t() @ xmx
    w_hat = mx - 0.5 * xxmx
    w = w_hat - w_hat.t()
    t = 0.5 * 2 / (w.abs().sum(dim=0).max() + 1e-8)
    alpha = min(t.item(), lr)
    y = x.t() + alpha * v
    for _ in range(iterations):
        y = x.t() + alpha * w @ (0.5 * (x.t() + y))
    return y.t()


@pytest.mark.parametrize("shape", [(8, 8), (3, 8)])
def test_a_step_is_the_official_update_with_its_iteration_converged(shape):
    p, n = shape
    start = orthogonal(n, 0)[:p]
    grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    param = torch.nn.Parameter(start.clone())
    param.grad = grad.clone()
    CayleySGD([param], lr=1.5).step()
    expected = official_step(start, grad, lr=1.5, iterations=200)
    # 1e-8: the official row normalisation divides by the norm plus 1e-8
    torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-7)
    # the official five iterations differ from the exact step by more than rounding: the loop is an approximation
    assert (official_step(start, grad, lr=1.5, iterations=5) - expected).abs().max() > 1e-6


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_the_rows_stay_orthonormal_over_a_thousand_steps(dtype, tolerance):
    n = 64
    param = torch.nn.Parameter(orthogonal(n, 0, dtype))
    optimizer = CayleySGD([param], lr=1.5)
    g = torch.Generator().manual_seed(2)
    for _ in range(1000):
        param.grad = torch.randn(n, n, generator=g).to(dtype)
        optimizer.step()
    error = (param.detach().double() @ param.detach().double().T - torch.eye(n, dtype=torch.float64)).abs().max()
    assert error < tolerance
    assert (param.detach().double() - orthogonal(n, 0)).abs().max() > 0.1  # it moved


def test_a_gradient_normal_to_the_manifold_does_not_move_it():
    start = orthogonal(16, 3)
    sym = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    param = torch.nn.Parameter(start.clone())
    param.grad = (sym + sym.T) @ start  # S P with S symmetric: the normal space of the orthogonal group at P
    CayleySGD([param], lr=1.5).step()
    torch.testing.assert_close(param.detach(), start, rtol=0, atol=1e-12)


def test_the_loss_of_a_toy_rotation_problem_goes_down():
    """min over orthogonal R of ‖X R - Y‖² with Y = X R*: zero at R = R*."""
    x = torch.randn(256, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    target = x @ orthogonal(16, 6)
    param = torch.nn.Parameter(orthogonal(16, 7))
    optimizer = CayleySGD([param], lr=1.5)
    losses = []
    for _ in range(300):
        optimizer.zero_grad()
        loss = (x @ param - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(losses[:51]))  # each early step descends


def test_it_refuses_a_matrix_with_more_rows_than_columns():
    with pytest.raises(ValueError, match="p <= n"):
        CayleySGD([torch.nn.Parameter(torch.zeros(5, 3))], lr=1.0)
