"""A run's quantization scheme: what the short bit spec (``W4A4``) does not say, and the one function that
turns a method and a bit spec into the ``BitSpec`` it runs with.

Every route builds its spec here: the sweep (``harness.run.config``), ``ptqbench.quantize``, ``ptqbench
bench``; a stored run keeps the result (``RunRecord.bit_spec``), which export and ``ptqbench eval`` reuse.
So one method, bit spec, ``quant`` mapping and seed give one model whichever way it is run::

    spec = effective_spec(get_method("quarot"), "W4A4KV4")          # QuaRot's paper settings
    spec = effective_spec(get_method("rtn"), "W4A4", {"attention": False})

Precedence, lowest first: the defaults below; the method's ``quant_defaults`` (its paper's settings);
the keys the caller's ``quant`` mapping sets (a sweep's ``quant:`` section); a method entry's own ``quant:``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from harness import schema
from harness.bits import BitSpec
from harness.errors import ConfigError

if TYPE_CHECKING:
    from harness.method import Method


@dataclass(frozen=True)
class QuantSchemeConfig:
    """Choices the short bit spec does not encode (defaults follow QLLM / OmniQuant: asymmetric).

    Values are checked where they are used, by ``BitSpec`` (one place for the allowed values).

    Args:
    attention: quantize the attention inputs too (Q and K after RoPE, V; per token and head, at the
        activation bits; harness/quant/attention.py). auto = whenever activations are quantized below
        16 bits, the protocol of the QLLM and OmniQuant papers and codes; false = the linears'
        inputs only (ptqbench before this setting existed); true = always set (a no-op at A16).
    attention_scope: head = Q/K after RoPE and V per token and head (QLLM, OmniQuant); projection =
        the q/k/v projection outputs per token over all heads, before RoPE (SmoothQuant's official
        fake_quant.py with quantize_bmm_input).
        With a KV part in the bit spec (``W4A4KV4``) K and V take the KV bits and ``attention`` decides
        Q alone (QuaRot: false).
    act_clip_ratio: per-token activation ranges are [min, max] times this, in (0, 1] (QuaRot's paper: 0.9).
    kv_clip_ratio: the same for K and V at the KV bits (QuaRot's paper: 0.95).
    kv_symmetric: symmetric K and V at the KV bits; null = as act_symmetric (QuaRot's paper: false).
    symmetric_grid: restricted = [-(2^(b-1) - 1), 2^(b-1) - 1] (SmoothQuant), full = [-2^(b-1), 2^(b-1) - 1]
        (GPTQ's and QuaRot's symmetric grid); see ``BitSpec.symmetric_grid``.

    A method's ``quant_defaults`` (QuaRot: its paper's settings) fill the keys the sweep's section leaves
    out; a method entry's own ``quant:`` mapping overrides both for that entry.
    """

    weight_symmetric: bool = False
    act_symmetric: bool = False
    weight_granularity: str = "channel"
    attention: Literal["auto", True, False] = "auto"
    attention_scope: str = "head"
    act_clip_ratio: float = 1.0
    kv_clip_ratio: float = 1.0
    kv_symmetric: bool | None = None
    symmetric_grid: str = "restricted"

    def __post_init__(self) -> None:
        self.bit_spec("W16A16")  # validates the scheme's fields

    def for_method(self, method_cls: type[Method], explicit: Iterable[str] = (), own: Any = None,
                   where: str = "quant") -> QuantSchemeConfig:
        """The scheme ``method_cls`` runs with: its ``quant_defaults`` for the keys not in ``explicit`` (those the
        YAML section set), then ``own`` (the method entry's ``quant:`` mapping)."""
        if own is not None and not isinstance(own, dict):
            raise ConfigError(f"{where}: expected a mapping of quant settings, got {type(own).__name__}")
        explicit = set(explicit)
        merged = {k: v for k, v in method_cls.quant_defaults.items() if k not in explicit}
        merged.update(own or {})
        if not merged:
            return self
        try:
            return schema.from_dict(QuantSchemeConfig, {**schema.to_dict(self), **merged}, where)
        except ConfigError as err:  # BitSpec's checks name their field quant.<key> already
            raise ConfigError(str(err).replace(f"{where}.quant.", f"{where}.")) from None

    def bit_spec(self, text: str | BitSpec) -> BitSpec:
        """``text`` (``W4A4``) with this scheme's symmetry, granularity and attention setting."""
        spec = BitSpec.parse(text, w_symmetric=self.weight_symmetric, a_symmetric=self.act_symmetric,
                             w_granularity=self.weight_granularity, a_clip=self.act_clip_ratio, kv_clip=self.kv_clip_ratio,
                             kv_symmetric=self.kv_symmetric, symmetric_grid=self.symmetric_grid)
        attention = spec.quantizes_activations if self.attention == "auto" else bool(self.attention)
        return replace(spec, attention=attention, attention_scope=self.attention_scope)


def effective_spec(method: type[Method] | Method, bits: str | BitSpec, quant: Mapping[str, Any] | QuantSchemeConfig | None = None,
                   own: Mapping[str, Any] | None = None, where: str = "quant") -> BitSpec:
    """The ``BitSpec`` ``method`` runs ``bits`` with, exactly as a sweep builds it.

    ``quant``: a sweep's ``quant:`` section as a mapping (the keys it sets win over the method's
    ``quant_defaults``) or a parsed ``QuantSchemeConfig`` (all of its keys win); ``own``: a method entry's
    own ``quant:``. A ``BitSpec`` passed as ``bits`` is already a whole scheme and is returned unchanged
    (``quant`` must then be empty).
    """
    if isinstance(bits, BitSpec):
        if quant or own:
            raise ConfigError(f"{where}: a BitSpec already carries its whole scheme; pass the bit spec as a string "
                              "(e.g. 'W4A4') to apply quant settings")
        return bits
    method_cls = method if isinstance(method, type) else type(method)
    if isinstance(quant, QuantSchemeConfig):
        scheme, explicit = quant, {f for f in schema.to_dict(quant)}
    else:
        if quant is not None and not isinstance(quant, Mapping):
            raise ConfigError(f"{where}: expected a mapping of quant settings, got {type(quant).__name__}")
        scheme = schema.from_dict(QuantSchemeConfig, dict(quant or {}), where)
        explicit = set(quant or {})
    return scheme.for_method(method_cls, explicit, dict(own) if own is not None else None, where).bit_spec(bits)
