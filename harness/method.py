"""The ``Method`` interface every quantization method implements.

A method is a name, a one-line description, a frozen config dataclass with defaults, and one
entry point::

    result = method.quantize(model, spec, calibration, context)

It changes ``model`` in place (and returns it in ``result.model``), leaves every decoder linear a
frozen ``QuantLinear`` (or FP for the baseline), and returns statistics worth keeping with the run
(chosen thresholds, losses, ...) in ``result.stats``. See ``methods/rtn.py`` for the smallest one.

The framework never calls ``quantize`` directly: every route (the sweep, ``ptqbench.quantize``, the
benches, the export of a stored run) calls :meth:`Method.apply`, which refuses what ``check`` and
``check_model`` refuse before any work, then quantizes. A method checks nothing twice itself.

Besides ``quantize``, a method may say what it refuses (``check(spec)``, ``check_model(config)``: the
model's transformers ``PretrainedConfig``, see :func:`pretrained_config`) and what it holds at its peak
(``working_memory(config) -> WorkingMemory``, which the memory estimate reads). A block-wise method
describes its work per block group to the engine with ``harness.engine.hooks.BlockHooks``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from harness import schema
from harness.adapter import SUPPORTED_MODEL_TYPES, get_adapter
from harness.bits import BitSpec
from harness.errors import ConfigError

# Field metadata: an option added after results were keyed (see :func:`keyed_when_set`), and its one-line meaning.
_KEYED_WHEN_SET = "ptqbench_keyed_when_set"
_HELP = "ptqbench_help"


def option(default: Any, help: str) -> Any:
    """A method option: its default and its one-line meaning, which ``ptqbench methods --options`` and the
    method's page in docs/methods/ print (``harness.method.options``)."""
    return field(default=default, metadata={_HELP: help})


def keyed_when_set(default: Any, help: str = "") -> Any:
    """An option (as :func:`option`) left out of ``to_dict()`` while it has its default.

    A run's key hashes its method's ``to_dict()`` (``harness.run.execute``), and so does the report's
    variant label: an option added later with this default keeps every earlier run's key and label,
    and a run that sets it to anything else gets a key of its own.
    """
    return field(default=default, metadata={_KEYED_WHEN_SET: True, _HELP: help})


@dataclass(frozen=True)
class OptionDoc:
    """One option as users see it: name, type, default and meaning (empty for a plugin that gives none)."""

    name: str
    type: str
    default: Any
    help: str


def options(config_class: type[MethodConfig]) -> list[OptionDoc]:
    """The options of a method config, in declaration order."""
    hints = typing.get_type_hints(config_class)
    docs = []
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        docs.append(OptionDoc(f.name, _type_name(hints[f.name]), default, f.metadata.get(_HELP, "")))
    return docs


def _type_name(tp: Any) -> str:
    """``int``, ``float | None``, ``"exact" | "off"`` (a Literal's values)."""
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(f'"{v}"' if isinstance(v, str) else repr(v) for v in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


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


@dataclass(frozen=True)
class WorkingMemory:
    """What a method holds at its peak beyond the engine's own (one block group, its float32 working
    copy, the activation buffers, a training step's temporaries): ``harness.engine.memory`` adds it to a
    run's estimate, so a run the machine cannot hold stops before loading. Measured with `ptqbench bench-scale`.

    Args:
        blocks_per_job: decoder blocks the method works on together (the engine's group).
        weight_copies: float32 weight-sized copies of the block group (autograd's saved tensors of its
            weight transforms, cached quantized weights).
        extra_bytes: anything else it holds on the compute device (GPTQ's Hessians, a batch of search
            candidates).
        samples: calibration samples whose inputs inside a block (each linear's) it keeps in float32 while
            it searches; None = all of the run's calibration samples.
        token_bytes: bytes it holds on the compute device per token of a calibration window (the activations a
            backward pass through a batch of whole windows keeps); the estimate multiplies it by the windows'
            length.
    """

    blocks_per_job: int = 1
    weight_copies: float = 0.0
    extra_bytes: int = 0
    samples: int | None = 0
    token_bytes: int = 0


def pretrained_config(config: PretrainedConfig | dict) -> PretrainedConfig:
    """A model's transformers config: as it is, or built from its config.json read as a dict (the sweep's
    checks read config.json without loading the model). What ``check_model`` and ``working_memory`` take."""
    return AutoConfig.for_model(**config) if isinstance(config, dict) else config


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
    # False for methods that draw nothing from the seed (no random init, no sampling). With
    # needs_calibration False too the seed cannot change the result: a seed sweep runs them once
    # (at its first seed) and reports say that one run stands for every seed (``seed_independent``).
    seeded: ClassVar[bool] = True
    # The sweep's ``quant:`` settings this method runs with unless the sweep's ``quant:`` section (or the method
    # entry's own ``quant:``) sets them: the settings of its paper, e.g. QuaRot's symmetric weights and clip ratios.
    quant_defaults: ClassVar[dict[str, Any]] = {}

    def check(self, spec: BitSpec) -> None:
        """Refuse, with a one-line ``ConfigError``, a bit spec these options cannot serve; the sweep calls it
        for every planned run when the config is parsed, before any work. Accepts everything by default."""

    def check_model(self, config: PretrainedConfig) -> None:
        """Refuse, with a one-line ``ConfigError``, a model these options cannot serve (``config``: its transformers
        config); the sweep calls it before any work where the config is on this machine. Accepts everything by default."""

    def working_memory(self, config: PretrainedConfig) -> WorkingMemory:
        """What these options hold at their peak for a model with ``config`` (see :class:`WorkingMemory`).
        Nothing beyond the engine's own by default."""
        return WorkingMemory()

    @classmethod
    def seed_independent(cls) -> bool:
        """Whether the seed cannot change this method's result (no calibration data, no randomness)."""
        return not cls.needs_calibration and not cls.seeded

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

    def apply(self, model: nn.Module, spec: BitSpec, calibration: torch.Tensor | None, context: QuantContext) -> QuantizeResult:
        """What every route calls: :meth:`check` the spec and :meth:`check_model` the model, then :meth:`quantize` the
        model in its adapter's layout (``LlamaAdapter.prepare``: separate linears where its family fuses or stacks
        projections; a model from ptqbench's loaders already is, one built elsewhere is prepared here, in place)."""
        self.check(spec)
        config = getattr(model, "config", None)
        if config is not None:
            self.check_model(pretrained_config(config))
            if getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES:
                get_adapter(model).prepare(model)
        return self.quantize(model, spec, calibration, context)

    @abstractmethod
    def quantize(self, model: nn.Module, spec: BitSpec, calibration: torch.Tensor | None, context: QuantContext) -> QuantizeResult:
        """Quantize ``model`` in place for ``spec``; ``calibration`` is (samples, seqlen) token ids or None."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"{type(self).__name__}({fields})"
