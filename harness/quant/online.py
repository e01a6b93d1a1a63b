"""Online transforms: modules that run on a linear's input before it is quantized, found by kind.

An online transform is one half of an FP-exact pair whose other half is folded into the linear's weight
(QuaRot's Hadamard before down_proj: x -> x Hᵀ online, W <- W Hᵀ offline), so the layer computes the
same function and quantizes the transformed activation. It sits on ``QuantLinear.input_transform``
(``harness.quant.qlinear.with_input_transform`` installs it, every weight solver keeps it).

A transform is described by its recipe, a JSON mapping ``{"kind": ..., ...}`` (``to_dict()``), and is
rebuilt from it (``from_dict``): ptqbench's export format writes the recipe into its manifest, and
``load_quantized`` rebuilds the module with :func:`online_transform`, so a transform holds no persistent
tensor that its recipe does not determine (the exporter refuses one that does). A plugin adds a kind
without touching ``harness``::

    from harness.quant.online import OnlineTransform, register_online_transform

    @register_online_transform
    class Negate(OnlineTransform):
        kind = "my_plugin.negate"

        def forward(self, x):
            return -x

        def to_dict(self):
            return {"kind": self.kind}

The built-in kinds (``hadamard``, ``heads_then_hadamard``, ``kronecker``, ``residual_rotation``:
``harness.quant.rotation``) register when their module is imported, which every lookup does first. A
plugin's kinds register when its package is imported; a lookup that finds no kind loads the method
plugins (``harness.registry``: their packages are imported) once before it gives up, so a plugin method's
exported model reloads in a fresh process.
"""
from __future__ import annotations

import importlib
from typing import Any, ClassVar

from torch import nn

from harness.errors import ConfigError, UnknownNameError, did_you_mean

BUILTIN_MODULE = "harness.quant.rotation"


class OnlineTransform(nn.Module):
    """Base class of the online transforms: set ``kind``, implement ``forward`` and ``to_dict``.

    ``from_dict`` rebuilds the transform from ``to_dict()``'s mapping; by default it passes every key but
    ``kind`` to the constructor, so a transform whose constructor takes its recipe's keys needs nothing more.
    """

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The recipe, JSON data with this class's ``kind``: what an export writes and ``from_dict`` reads."""
        raise NotImplementedError(f"{type(self).__qualname__} does not say its recipe (to_dict)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OnlineTransform:
        """The transform ``data`` (a ``to_dict()`` mapping) describes."""
        return cls(**{key: value for key, value in data.items() if key != "kind"})


_KINDS: dict[str, type[OnlineTransform]] = {}


def register_online_transform(cls: type[OnlineTransform]) -> type[OnlineTransform]:
    """Class decorator: make ``cls`` the transform of ``cls.kind`` (a subclass of :class:`OnlineTransform`; one class
    per kind)."""
    if not (isinstance(cls, type) and issubclass(cls, OnlineTransform)):
        raise TypeError(f"{cls!r} is not a subclass of harness.quant.online.OnlineTransform")
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__qualname__} has no `kind`")
    existing = _KINDS.get(kind)
    same = existing is not None and (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
    if existing is not None and not same:  # the same class defined again (a reloaded module) replaces itself
        raise ValueError(f"online transform kind {kind!r} is already registered by "
                         f"{existing.__module__}.{existing.__qualname__}")
    _KINDS[kind] = cls
    return cls


def online_kinds() -> list[str]:
    """Every registered kind, the built-ins included."""
    importlib.import_module(BUILTIN_MODULE)
    return sorted(_KINDS)


def _load_plugins() -> None:
    from harness.registry import REGISTRY

    REGISTRY.names()  # imports the in-tree methods and every plugin's package


def online_transform(data: dict[str, Any]) -> OnlineTransform:
    """The online transform a ``to_dict()`` mapping describes (an exported model's manifest entry)."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise ConfigError(f"input_transform: {data!r} names no kind; an online transform is a mapping with a 'kind'")
    kind = data["kind"]
    if kind not in online_kinds():
        _load_plugins()
    if kind not in _KINDS:
        known = sorted(_KINDS)
        raise UnknownNameError(f"input_transform: unknown kind {kind!r}{did_you_mean(kind, known)}; known: "
                               f"{', '.join(known)} (a plugin's kind registers when its package is imported)")
    return _KINDS[kind].from_dict(data)
