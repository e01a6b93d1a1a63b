"""FlatQuant's learnable transforms, its learnable clipping, and the online transform a quantized model keeps.

- :func:`kron_apply`: x -> x (A ⊗ B) over the last dimension without forming A ⊗ B (x viewed as (..., a, b):
  x B, then Aᵀ from the left; the official ``kronecker_matmul``); a missing factor is the identity.
- :class:`InvertibleMatrix`: one learnable invertible matrix in either official parametrisation: ``svd``
  (P = U diag(σ) Vᵀ with U, V orthogonal through PyTorch's Cayley parametrisation, P^-T = U diag(1/σ) Vᵀ:
  the official default, ``SVD*TransMatrix``) or ``inverse`` (P itself, P^-T from a float64 inverse: official
  ``--direct_inv``). Both start from random orthogonal matrices, as the official ``get_init_weight``.
- :class:`KroneckerTransform`: P = P1 ⊗ P2 of a linear's input width, split as the official
  ``get_decompose_dim`` (the two closest factors n = (a - b)(a + b)), with an optional per-channel scale d
  (``add_diag``): the input becomes (x d) P and the weight W d^-1 P^-T, so the product is unchanged.
- :class:`ClippedActQuantizer`: per-token activation quantization whose range is [min σ(β), max σ(γ)]
  (LAC; γ = β = 4 at the start, one pair per quantizer); :func:`clip_rows`: each weight row clamped to
  [min σ(β), max σ(γ)] before it is rounded (LWC, one pair per output row).
- :class:`KroneckerAffine`: the online half that stays after training, x -> x (A ⊗ B) with fixed factors,
  registered as the online transform ``kronecker_affine``: its recipe carries the factors (base64 float32),
  so an exported model rebuilds it.

After ruikangliu/FlatQuant 9d88ffc ``flatquant/trans_utils.py``, ``flat_utils.py``, ``function_utils.py``,
``flat_linear.py`` and ``quant_utils.py``.
"""
from __future__ import annotations

import base64
import math
import sys

import torch
from torch import nn
from torch.nn.utils import parametrizations

from harness import ActQuantizer, fake_quantize
from harness.quant.online import OnlineTransform, register_online_transform
from harness.quant.quantizer import row_range
from harness.quant.hadamard import random_orthogonal

LAC_INIT = LWC_INIT = 4.0  # sigmoid(4) = 0.982 of the range at the start (official init_value)


def decompose(n: int) -> tuple[int, int]:
    """The official ``get_decompose_dim``: n = (a - b)(a + b) with the smallest a >= sqrt(n) for which a² - n is a
    square; (24, 24) for 576, (32, 48) for 1536, (1, n) for a prime."""
    a = math.isqrt(n)
    a += a * a < n
    while math.isqrt(a * a - n) ** 2 != a * a - n:
        a += 1
    b = math.isqrt(a * a - n)
    return a - b, a + b


def kron_apply(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """x @ (left ⊗ right) over the last dimension; a None factor is the identity of the size that fills the width."""
    n = x.shape[-1]
    a = left.shape[0] if left is not None else n // right.shape[0]
    y = x.reshape(*x.shape[:-1], a, n // a)
    if right is not None:
        y = y @ right
    if left is not None:
        y = left.T @ y
    return y.reshape(x.shape)


class _Holder(nn.Module):
    """A module with one parameter ``weight``, for PyTorch's orthogonal parametrisation."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class InvertibleMatrix(nn.Module):
    """A learnable invertible n x n matrix P (float32): ``matrix()`` is P, ``inverse_t()`` P^-T."""

    def __init__(self, n: int, form: str, seed: int) -> None:
        super().__init__()
        self.form = form
        if form == "svd":
            # official SVDSingleTransMatrix: U, V start as the Cayley map of a random orthogonal matrix's skew part
            # (what torch's orthogonal(use_trivialization=False) makes of the initial weight), σ = 1
            self.u, self.v = (parametrizations.orthogonal(_Holder(random_orthogonal(n, seed + k).float()),
                                                          orthogonal_map="cayley", use_trivialization=False)
                              for k in (0, 1))
            self.sigma = nn.Parameter(torch.ones(n))
        elif form == "inverse":
            self.p = nn.Parameter(random_orthogonal(n, seed).float())
        else:
            raise ValueError(f"transform form {form!r}: use svd or inverse")

    def matrix(self) -> torch.Tensor:
        if self.form == "svd":
            return (self.u.weight * self.sigma) @ self.v.weight.T
        return self.p

    def inverse_t(self) -> torch.Tensor:
        if self.form == "svd":
            return (self.u.weight / self.sigma) @ self.v.weight.T
        return self.p.double().inverse().T.to(self.p.dtype)  # official get_inverse: in float64


class KroneckerTransform(nn.Module):
    """The learnable transform of one linear group's input: x -> (x d) (P1 ⊗ P2), weights W -> W d^-1 (P1 ⊗ P2)^-T."""

    def __init__(self, size: int, form: str, seed: int, diag: torch.Tensor | None = None) -> None:
        super().__init__()
        a, b = decompose(size)
        self.left, self.right = InvertibleMatrix(a, form, seed), InvertibleMatrix(b, form, seed + 2)
        self.diag = None if diag is None else nn.Parameter(diag.detach().float().clone())
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # q/k/v (gate/up) read one input: transform it once per forward, as the official forward does
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        y = x if self.diag is None else x * self.diag
        y = kron_apply(y, self.left.matrix(), self.right.matrix())
        self._last = (x, y)
        return y

    def forget(self) -> None:
        """Drop the last input and output kept for the linears that share them."""
        self._last = None

    def weight_side(self, w: torch.Tensor) -> torch.Tensor:
        """W d^-1 P^-T: the rows of a weight that reads this transform's output."""
        if self.diag is not None:
            w = w / self.diag
        return kron_apply(w, self.left.inverse_t(), self.right.inverse_t())

    def factors(self, inverse_t: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(P1, P2), or (P1^-T, P2^-T), detached."""
        pick = (lambda m: m.inverse_t()) if inverse_t else (lambda m: m.matrix())
        with torch.no_grad():
            return pick(self.left).detach(), pick(self.right).detach()


class ClippedActQuantizer(ActQuantizer):
    """Per-token activation quantization with learned clipping (LAC): range [min σ(β), max σ(γ)], one (γ, β) per
    quantizer; ``frozen()`` is the plain ``ActQuantizer`` with those ratios, the same values. An asymmetric zero
    point rounds without a gradient, as the official ``get_scale_zero`` (torch.round)."""

    zero_point_grad = False

    def __init__(self, bits: int, symmetric: bool, full_grid: bool) -> None:
        super().__init__(bits, symmetric, full_grid=full_grid)
        self.gamma = nn.Parameter(torch.full((1,), LAC_INIT))
        self.beta = nn.Parameter(torch.full((1,), LAC_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        xmin, xmax = row_range(x)
        return fake_quantize(x, xmin * torch.sigmoid(self.beta), xmax * torch.sigmoid(self.gamma), self.bits,
                             self.symmetric, self.zero_point_grad, self.full_grid)

    def ratios(self) -> tuple[float, float]:
        """(σ(γ), σ(β)): the learned clip of the maximum and of the minimum."""
        return torch.sigmoid(self.gamma).item(), torch.sigmoid(self.beta).item()

    def frozen(self) -> ActQuantizer:
        clip_max, clip_min = self.ratios()
        return ActQuantizer(self.bits, self.symmetric, clip_max, self.full_grid, clip_min)


def clip_rows(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """LWC: each row of ``w`` clamped to [min σ(β), max σ(γ)] (the official ``apply_wclip``; gradients reach the
    factors through the clamp and the weight through min and max)."""
    wmin, wmax = row_range(w)
    return torch.maximum(torch.minimum(w, wmax * torch.sigmoid(gamma)), wmin * torch.sigmoid(beta))


def _encode(t: torch.Tensor | None) -> dict | None:
    """A float32 tensor as JSON data: its shape and its little-endian bytes in base64 (exact)."""
    if t is None:
        return None
    data = t.detach().cpu().float().contiguous().numpy().tobytes()
    if sys.byteorder != "little":
        data = t.detach().cpu().float().contiguous().numpy().byteswap().tobytes()
    return {"shape": list(t.shape), "float32": base64.b64encode(data).decode("ascii")}


def _decode(d: dict | None) -> torch.Tensor | None:
    if d is None:
        return None
    values = torch.frombuffer(bytearray(base64.b64decode(d["float32"])), dtype=torch.float32)
    if sys.byteorder != "little":
        values = values.view(torch.uint8).view(-1, 4).flip(-1).contiguous().view(torch.float32).reshape(-1)
    return values.reshape(d["shape"]).clone()


@register_online_transform
class KroneckerAffine(OnlineTransform):
    """Online: x -> x (left ⊗ right) over the last dimension (a None factor: the identity), in at least float32.

    FlatQuant's transforms after training: q/k/v's, gate/up's and down_proj's input (P1 ⊗ P2, their scales
    folded into the norms and up_proj), o_proj's input (Po ⊗ I: heads mixed, v_proj's per-head half folded into
    its weight), and Q and K after RoPE (Pk^-T and Pk). The factors are non-persistent buffers and travel in
    the recipe, so an export's manifest alone rebuilds the transform.
    """

    kind = "kronecker_affine"

    def __init__(self, left: torch.Tensor | dict | None = None, right: torch.Tensor | dict | None = None) -> None:
        super().__init__()
        left, right = (_decode(f) if isinstance(f, dict) else f for f in (left, right))
        if left is None and right is None:
            raise ValueError("kronecker_affine: give at least one factor")
        self.register_buffer("left", None if left is None else left.detach().float().clone(), persistent=False)
        self.register_buffer("right", None if right is None else right.detach().float().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        factors = (None if f is None else f.to(y.dtype) for f in (self.left, self.right))
        return kron_apply(y, *factors).to(x.dtype)

    def matrix(self, width: int) -> torch.Tensor:
        """The dense (width x width) matrix, for tests: x @ matrix(width) is forward(x)."""
        return kron_apply(torch.eye(width), self.left, self.right)

    def extra_repr(self) -> str:
        return " ⊗ ".join("I" if f is None else "x".join(map(str, f.shape)) for f in (self.left, self.right))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "left": _encode(self.left), "right": _encode(self.right)}
