"""Stochastic gradient descent on the Stiefel manifold by the Cayley transform (Li, Li & Todorovic, ICLR 2020).

A parameter is a (p, n) matrix with orthonormal rows, p <= n; a square one is orthogonal, as the rotations
SpinQuant learns are. Plain SGD would leave the manifold; each step here moves along a curve that stays on it.
With Y = Pᵀ (n x p, orthonormal columns) and G its gradient (the parameter's gradient transposed):

    Ŵ = -G Yᵀ + ½ Y (Yᵀ G) Yᵀ,   W = Ŵ - Ŵᵀ  (skew-symmetric, n x n)
    α = min(lr, 1 / (‖W‖₁ + 1e-8))
    Y <- (I - α/2 W)⁻¹ (I + α/2 W) Y

(I - α/2 W)⁻¹ (I + α/2 W) is the Cayley transform of a skew-symmetric matrix, an orthogonal matrix, so Y keeps
orthonormal columns; to first order the step is Y - α W Y, a descent direction of the loss. The cap
α <= 1 / ‖W‖₁ (the largest column sum of |W|) bounds the step where the gradient is large, so ``lr`` is an upper
bound: the official SpinQuant learning rate of 1.5 is mostly the cap.

This is the update of facebookresearch/SpinQuant 8f47aa3 ``train_utils/optimizer.py`` (``SGDG`` with
``stiefel=True`` and momentum 0, as SpinQuant's trainer builds it), with one difference: the official code
approximates the inverse by five fixed-point iterations, renormalises the rows every step and orthonormalises
them by a QR decomposition on a random 1% of the steps, so its iterates drift off the manifold between those;
here the linear system is solved exactly, in float64, so the rows stay orthonormal to float rounding at every
step without any retraction (``tests/harness/optim/test_cayley.py``: within 2e-6 after a thousand float32 steps, 1e-12 in float64).

    optimizer = CayleySGD([rotation], lr=1.5)   # rotation: an orthogonal nn.Parameter
    loss.backward(); optimizer.step()
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer

# keeps the step cap finite for a zero gradient (the official constant)
EPSILON = 1e-8


class CayleySGD(Optimizer):
    """SGD on the Stiefel manifold (module docstring). Each parameter: a (p, n) matrix with orthonormal rows,
    p <= n; its step size after the cap is kept as ``state[p]["step_size"]``."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr})
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2 or p.shape[0] > p.shape[1]:
                    raise ValueError(f"CayleySGD takes (p, n) matrices with p <= n (orthonormal rows); got shape "
                                     f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                y = p.detach().to(torch.float64).T
                g = p.grad.detach().to(torch.float64).T
                w_hat = -g @ y.T + 0.5 * y @ (y.T @ g) @ y.T
                w = w_hat - w_hat.T
                alpha = min(group["lr"], 1.0 / (w.abs().sum(dim=0).max().item() + EPSILON))
                half = (0.5 * alpha) * w
                eye = torch.eye(w.shape[0], dtype=torch.float64, device=w.device)
                y = torch.linalg.solve(eye - half, (eye + half) @ y)
                p.copy_(y.T)
                self.state[p]["step_size"] = alpha
        return loss
