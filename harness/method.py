"""The ``Method`` interface every quantization method implements.

A method is a name, a one-line description, a frozen config dataclass with defaults, and one
entry point::

    result = method.quantize(model, spec, calibration, context)

It changes ``model`` in place (and returns it in ``result.model``), leaves every decoder linear a
frozen ``QuantLinear`` (or FP for the baseline), and returns statistics worth keeping with the run
(chosen thresholds, losses, ...) in ``result.stats``. See ``methods/rtn.py`` for the smallest one.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from harness import schema
from harness.bits import BitSpec
from harness.errors import ConfigError


# Field metadata of an option added after results were keyed (see :func:`keyed_when_set`).
_KEYED_WHEN_SET = "ptqbench_keyed_when_set"


def keyed_when_set(default: Any) -> Any:
    """A config field left out of ``to_dict()`` while it has its default.

    A run's key hashes its method's ``to_dict()`` (``harness.run.execute``), and so does the report's
    variant label: an option added later with this default keeps every earlier run's key and label,
    and a run that sets it to anything else gets a key of its own.
    """
    return field(default=default, metadata={_KEYED_WHEN_SET: True})


@dataclass(frozen=True)
class MethodConfig:
    """Base class of method configs: frozen dataclasses that validate in ``__post_init__``."""

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "") -> MethodConfig:
        return schema.from_dict(cls, data or {}, where)

    def to_dict(self) -> dict[str, Any]:
        data = schema.to_dict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get(_KEYED_WHEN_SET) and data[f.name] == schema.to_dict(f.default):
                del data[f.name]
        return data


@dataclass
class QuantContext:
    """What a method may use besides the model: where to compute, the seed, progress display."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: bool = True


@dataclass
class QuantizeResult:
    model: nn.Module
    stats: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """Subclass, set the class attributes, implement :meth:`quantize`, decorate with ``@register_method``."""

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # False for methods that never look at data (RTN); the sweep then skips loading calibration text.
    needs_calibration: ClassVar[bool] = True
    # True for the FP baseline: it runs once per model at W16A16 whatever the sweep's bits.
    is_baseline: ClassVar[bool] = False
    # Float32 weight-sized copies of a block group the method holds at its peak beyond the group itself
    # (autograd's saved tensors of its weight transforms, cached quantized weights): harness.engine.memory
    # adds them to a run's estimate (a property where the options change it). Measured with `ptqbench bench-scale`.
    weight_copies: ClassVar[float] = 0.0

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{self.name}: config must be {self.config_class.__name__}, got {type(self.config).__name__}")

    @classmethod
    def from_options(cls, options: dict | None, where: str = "") -> Method:
        return cls(cls.config_class.from_dict(options, where or f"methods.{cls.name}"))

    def require_calibration(self, calibration: torch.Tensor | None) -> torch.Tensor:
        """The calibration tokens, or the one-line error every data-driven method gives without them."""
        if calibration is None:
            raise ConfigError(f"calibration: {self.name} needs calibration data (the sweep's calibration: section)")
        return calibration

    @abstractmethod
    def quantize(self, model: nn.Module, spec: BitSpec, calibration: torch.Tensor | None, context: QuantContext) -> QuantizeResult:
        """Quantize ``model`` in place for ``spec``; ``calibration`` is (samples, seqlen) token ids or None."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"{type(self).__name__}({fields})"
