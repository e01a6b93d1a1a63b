"""The equivalent transforms every adapter performs: each leaves the FP function unchanged.

One place does the algebra of moving a per-channel scale or a shift across a producer and its consumers,
folding a norm's factor into the linears it feeds, and rotating (or mapping by any invertible linear map:
``transform_input``, ``transform_output``) a linear's input or output side with its bias, in the family's
terms (a norm's factor is its weight plus ``norm_offset``: Gemma's norms multiply by 1 + w). Methods call these
and never touch a weight for a transform themselves. In-place operations work in at least float32 (a product
of two float32 weights is exact before its one rounding), rotations and linear maps in float64;
``scaled_weight`` and ``scaled_norm_weight`` are the differentiable forms for transforms learned through a
parametrization (OmniQuant's LET). ``tests/harness/adapter/test_families.py`` checks each on every family.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from harness.errors import ConfigError


@dataclass(frozen=True)
class ScalePair:
    """A module whose output is the input of ``consumers``: a per-channel scale can move across it.

    ``producer`` is a norm (scale its effective weight) or a linear (scale its output rows and bias);
    dividing the producer's output by s and multiplying the consumers' input columns by s leaves the
    FP function unchanged.
    """

    name: str
    producer: str
    consumers: tuple[str, ...]


class EquivalentTransforms:
    """The transforms of :class:`harness.adapter.base.LlamaAdapter`; it supplies ``norm_offset``, ``family``,
    ``final_norm`` and ``lm_head``."""

    norm_offset: float
    family: str

    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        """The per-channel factor a norm multiplies by: its weight (plus the family's offset), in at least float32."""
        return _wide(norm.weight.detach()) + self.norm_offset

    def set_norm_scale(self, norm: nn.Module, scale: torch.Tensor) -> None:
        """Make ``norm`` multiply by ``scale`` (Gemma's offset norm stores scale - 1)."""
        norm.weight.data = (scale - self.norm_offset).to(norm.weight.dtype)

    def scaled_norm_weight(self, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """The weight that makes a norm of weight ``weight`` multiply by ``factor`` times what it does now.

        Differentiable, for transforms learned through a parametrization (OmniQuant's LET); :meth:`fold_scale`
        is the in-place operation.
        """
        if not self.norm_offset:
            return weight * factor
        return (weight + self.norm_offset) * factor - self.norm_offset

    @staticmethod
    def scaled_weight(weight: torch.Tensor, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> torch.Tensor:
        """A linear's weight with its output channels multiplied by ``rows`` and its input channels by ``columns``.

        Differentiable, for transforms learned through a parametrization (OmniQuant's LET); a bias takes ``rows``
        too. :meth:`scale_rows` and :meth:`scale_columns` are the in-place operations.
        """
        if rows is not None:
            weight = weight * rows[:, None]
        return weight if columns is None else weight * columns[None, :]

    def fold_scale(self, layer: nn.Module, pair: ScalePair, scale: torch.Tensor) -> None:
        """Divide ``pair``'s producer output by ``scale`` and multiply its consumers' input columns by it.

        The producer is a norm (its effective weight divided; a norm bias too) or a linear (its output rows and
        bias divided). Exact in FP: the consumers see the same products. The one place a per-channel scale moves.
        """
        producer = layer.get_submodule(pair.producer)
        s = _wide(scale.detach().to(producer.weight.device, torch.promote_types(scale.dtype, producer.weight.dtype)))
        if isinstance(producer, nn.Linear):
            producer.weight.data = (_wide(producer.weight) / s[:, None]).to(producer.weight.dtype)
        else:
            self.set_norm_scale(producer, self.norm_scale(producer) / s)
        if getattr(producer, "bias", None) is not None:
            producer.bias.data = (_wide(producer.bias) / s).to(producer.bias.dtype)
        for name in pair.consumers:
            self.scale_columns(layer.get_submodule(name), s)

    def fold_shift(self, layer: nn.Module, pair: ScalePair, shift: torch.Tensor) -> None:
        """Make ``pair``'s consumers read x - ``shift`` instead of x: the producer's bias takes -shift (a linear producer
        gets a bias if it has none) and each consumer's bias W shift. Exact in FP. A norm without a bias cannot take it."""
        producer = layer.get_submodule(pair.producer)
        if getattr(producer, "bias", None) is None and not isinstance(producer, nn.Linear):
            raise ConfigError(f"model: the {self.family} module {pair.producer} ({type(producer).__name__}) has no bias "
                              "to take a shift")
        for name in pair.consumers:
            linear = layer.get_submodule(name)
            moved = linear.weight.detach() @ shift.to(linear.weight)
            if linear.bias is None:
                linear.bias = nn.Parameter(moved, requires_grad=False)
            else:
                linear.bias.data = linear.bias.data + moved
        if producer.bias is None:
            producer.bias = nn.Parameter(torch.zeros_like(producer.weight[:, 0]), requires_grad=False)
        producer.bias.data = producer.bias.data - shift.to(producer.bias)

    def norm_foldable(self, norm: nn.Module) -> bool:
        """Whether ``norm`` computes x / rms(x) times a per-channel factor and nothing else (an RMSNorm with a weight and
        no bias), so :meth:`fold_norm` can move the factor into the linears it feeds (a LayerNorm subtracts the mean)."""
        return (type(norm).__name__.endswith("RMSNorm") and getattr(norm, "weight", None) is not None
                and getattr(norm, "bias", None) is None)

    def fold_norm(self, layer: nn.Module, pair: ScalePair) -> None:
        """Move a norm's per-channel factor into its consumers' input columns; the norm then only normalises."""
        norm = layer.get_submodule(pair.producer)
        if getattr(norm, "bias", None) is not None:
            raise ConfigError(f"model: the {self.family} norm {pair.producer} has a bias, which cannot be folded into "
                              f"{', '.join(pair.consumers)}")
        self._fold_norm(norm, [layer.get_submodule(name) for name in pair.consumers])

    def fold_final_norm(self, model: nn.Module) -> None:
        """:meth:`fold_norm` for the final norm and ``lm_head`` (untie the head from the embedding first)."""
        norm = self.final_norm(model)
        if getattr(norm, "bias", None) is not None:
            raise ConfigError(f"model: the {self.family} final norm has a bias, which cannot be folded into lm_head")
        self._fold_norm(norm, [self.lm_head(model)])

    def _fold_norm(self, norm: nn.Module, linears: list[nn.Module]) -> None:
        scale = self.norm_scale(norm)
        for linear in linears:
            self.scale_columns(linear, scale)
        self.set_norm_scale(norm, torch.ones_like(scale))

    @staticmethod
    def scale_rows(linear: nn.Linear, scale: torch.Tensor) -> None:
        """Multiply the linear's output channels (weight rows and bias) by ``scale``."""
        s = scale.to(linear.weight.device)
        linear.weight.data = (_wide(linear.weight) * s[:, None]).to(linear.weight.dtype)
        if linear.bias is not None:
            linear.bias.data = (_wide(linear.bias) * s).to(linear.bias.dtype)

    @staticmethod
    def scale_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
        """Multiply the linear's input channels (weight columns) by ``scale``."""
        s = scale.to(linear.weight.device)
        linear.weight.data = (_wide(linear.weight) * s[None, :]).to(linear.weight.dtype)

    @staticmethod
    def rotate_input(linear: nn.Linear, q: torch.Tensor) -> None:
        """The linear reads ``x @ q`` instead of ``x``: W <- W q (float64 products; the bias is unchanged)."""
        w = linear.weight.data
        linear.weight.data = (w.double() @ q.to(w.device, torch.float64)).to(w.dtype)

    @staticmethod
    def rotate_output(linear: nn.Linear, q: torch.Tensor) -> None:
        """The linear writes ``y @ q`` instead of ``y``: W <- q^T W, and its bias b <- b q."""
        w = linear.weight.data
        q64 = q.to(w.device, torch.float64)
        linear.weight.data = (q64.T @ w.double()).to(w.dtype)
        if linear.bias is not None:
            linear.bias.data = (linear.bias.double() @ q64).to(linear.bias.dtype)

    @staticmethod
    def transform_input(linear: nn.Linear, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """W <- fn(W) for a linear map of row vectors ``fn`` (x -> x M, given float64 rows): the linear then reads
        x M^-T as it read x (the bias is unchanged). For maps too large to hold as one matrix (a Kronecker product
        applied factor by factor); :meth:`rotate_input` is the orthogonal case given as a matrix (M^-T = M)."""
        w = linear.weight.data
        linear.weight.data = fn(w.double()).to(w.dtype)

    @staticmethod
    def transform_output(linear: nn.Linear, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The linear writes fn(y) = y M instead of y, for a linear map of row vectors ``fn`` (given float64 rows):
        W <- fn(Wᵀ)ᵀ and its bias b <- fn(b) (:meth:`rotate_output` with M given as a function)."""
        w = linear.weight.data
        linear.weight.data = fn(w.double().T).T.to(w.dtype)
        if linear.bias is not None:
            linear.bias.data = fn(linear.bias.double()).to(linear.bias.dtype)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 where it is float64: the transforms' arithmetic never loses a model's precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
