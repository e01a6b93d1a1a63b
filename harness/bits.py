"""Bit specifications such as ``W4A4``, ``W4A16``, ``W4A4g128`` or ``W4A4KV4``.

A spec names the weight bits, the activation bits, optionally the KV-cache bits and a weight group size.
16 bits means "not quantized" (the FP16 baseline of the papers). Symmetry and per-tensor
weights are not part of the short string; they come from the sweep's ``quant:`` section and
are kept in the same frozen dataclass so every method sees one object.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from harness.errors import ConfigError

_SPEC_RE = re.compile(r"^W(\d+)A(\d+)(?:KV(\d+))?(?:G(\d+))?$")
MIN_BITS, MAX_BITS = 2, 16
WEIGHT_GRANULARITIES = ("channel", "tensor")
ATTENTION_SCOPES = ("head", "projection")
SYMMETRIC_GRIDS = ("restricted", "full")


@dataclass(frozen=True)
class BitSpec:
    """How weights and activations are quantized.

    Args:
        w_bits: weight bits, 2..16 (16 = keep FP weights).
        a_bits: activation bits, 2..16 (16 = keep FP activations).
        w_group: weight group size along the input dimension; 0 = one group per output channel.
        w_granularity: "channel" (per output channel, or per group) or "tensor" (one scale).
        w_symmetric: symmetric weight quantization (zero point 0) instead of asymmetric.
        a_symmetric: symmetric per-token activation quantization instead of asymmetric.
        attention: also quantize the attention inputs (Q and K after RoPE, V; per token and head)
            at ``a_bits`` with ``a_symmetric`` (see harness/quant/attention.py). The sweep's
            ``quant.attention: auto`` sets it whenever activations are quantized.
        attention_scope: "head" = Q/K after RoPE and V, one range per token and head (QLLM /
            OmniQuant); "projection" = the q/k/v projection outputs, one range per token over all
            heads, before RoPE (SmoothQuant's official ``quantize_bmm_input``).
        kv_bits: the KV cache's own bits (the ``KV`` part of ``W4A4KV4``; None = no KV part): K after
            RoPE and V, one range per token and head, at ``kv_bits`` (16 = FP) whatever ``attention``
            says; ``attention`` then decides Q alone (at ``a_bits``; QuaRot leaves Q FP, QLLM and
            OmniQuant quantize it). Without a KV part K and V follow ``attention``.
        a_clip: the per-token activation range is [min, max] times this ratio, in (0, 1] (QuaRot's
            ``--a_clip_ratio``); Q follows it.
        kv_clip: the same for K and V with a KV part (QuaRot's ``--k_clip_ratio`` / ``--v_clip_ratio``).
        kv_symmetric: symmetric K and V quantization with a KV part; None = as ``a_symmetric`` (QuaRot's paper
            setting is symmetric activations and asymmetric K/V: ``False``).
        symmetric_grid: the integer grid of symmetric quantization: "restricted" = [-(2^(b-1) - 1), 2^(b-1) - 1]
            (SmoothQuant; +x and -x quantize alike), "full" = [-2^(b-1), 2^(b-1) - 1] (GPTQ's and QuaRot's
            ``sym_quant``). The scale is max|x| / (2^(b-1) - 1) in both; they differ only where a clip ratio
            or a clip search leaves values beyond the range.
    """

    w_bits: int = 16
    a_bits: int = 16
    w_group: int = 0
    w_granularity: str = "channel"
    w_symmetric: bool = False
    a_symmetric: bool = False
    attention: bool = False
    attention_scope: str = "head"
    kv_bits: int | None = None
    a_clip: float = 1.0
    kv_clip: float = 1.0
    kv_symmetric: bool | None = None
    symmetric_grid: str = "restricted"

    def __post_init__(self) -> None:
        for field in ("w_bits", "a_bits", "kv_bits"):
            value = getattr(self, field)
            if field == "kv_bits" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
                raise ConfigError(f"bits.{field}: {value!r} is not allowed; use an integer {MIN_BITS}..{MAX_BITS}")
        for field, name in (("a_clip", "act_clip_ratio"), ("kv_clip", "kv_clip_ratio")):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"quant.{name}: {value!r} is not allowed; use a number in (0, 1]")
        if self.kv_symmetric is not None and not isinstance(self.kv_symmetric, bool):
            raise ConfigError(f"quant.kv_symmetric: {self.kv_symmetric!r} is not allowed; "
                              "use true, false or null (= act_symmetric)")
        if self.symmetric_grid not in SYMMETRIC_GRIDS:
            raise ConfigError(f"quant.symmetric_grid: {self.symmetric_grid!r} is not allowed; use one of {SYMMETRIC_GRIDS}")
        if self.kv_bits is not None and self.attention_scope != "head":
            raise ConfigError("quant.attention_scope: 'projection' cannot be combined with KV-cache bits (KV...); use head")
        if not isinstance(self.w_group, int) or self.w_group < 0:
            raise ConfigError(f"bits.w_group: {self.w_group!r} is not allowed; use 0 (per channel) or a positive group size")
        if self.w_granularity not in WEIGHT_GRANULARITIES:
            raise ConfigError(f"quant.weight_granularity: {self.w_granularity!r} is not allowed; use one of {WEIGHT_GRANULARITIES}")
        if not isinstance(self.attention, bool):
            raise ConfigError(f"quant.attention: {self.attention!r} is not allowed; use true or false")
        if self.attention_scope not in ATTENTION_SCOPES:
            raise ConfigError(f"quant.attention_scope: {self.attention_scope!r} is not allowed; use one of {ATTENTION_SCOPES}")
        if self.w_group and self.w_granularity == "tensor":
            raise ConfigError("quant.weight_granularity: 'tensor' cannot be combined with a group size (g...)")

    @classmethod
    def parse(cls, text: str | BitSpec, **scheme: object) -> BitSpec:
        """Parse ``W4A4`` / ``w4a16`` / ``W4A4g128``; ``scheme`` sets the non-string fields."""
        if isinstance(text, BitSpec):
            return replace(text, **scheme) if scheme else text  # type: ignore[arg-type]
        match = _SPEC_RE.match(str(text).strip().upper())
        if match is None:
            raise ConfigError(
                f"bits: {text!r} is not a bit spec; write W<bits>A<bits>[KV<bits>][g<group>], e.g. W4A4, W4A16, "
                "W4A4g128, W4A4KV4"
            )
        w, a, kv, g = match.groups()
        kv_bits = None if kv is None else int(kv)
        return cls(w_bits=int(w), a_bits=int(a), w_group=int(g or 0), kv_bits=kv_bits, **scheme)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        """The short string, e.g. ``W4A4g128`` or ``W4A4KV4`` (round-trips through :meth:`parse`)."""
        return (f"W{self.w_bits}A{self.a_bits}" + (f"KV{self.kv_bits}" if self.kv_bits is not None else "")
                + (f"g{self.w_group}" if self.w_group else ""))

    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < 16

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < 16

    @property
    def quantizes_attention(self) -> bool:
        return self.attention and self.quantizes_activations

    @property
    def quantizes_kv(self) -> bool:
        """Whether K and V are quantized (at ``kv_bits``, or with Q at ``a_bits`` without a KV part)."""
        return self.kv_bits < 16 if self.kv_bits is not None else self.quantizes_attention

    @property
    def kv_sym(self) -> bool:
        """Whether K and V are quantized symmetrically (``kv_symmetric``, else as the activations)."""
        return self.a_symmetric if self.kv_symmetric is None or self.kv_bits is None else self.kv_symmetric

    @property
    def full_grid(self) -> bool:
        """Whether symmetric quantization uses the full signed grid (``symmetric_grid: full``)."""
        return self.symmetric_grid == "full"

    @property
    def order_key(self) -> tuple[int, int, int, int]:
        """Sort key for tables and plots: most bits first (weights, activations, KV cache), then coarser groups.

        Per-channel (group 0) sorts before any group size of the same bits.
        """
        return (-self.w_bits, -self.a_bits, -(16 if self.kv_bits is None else self.kv_bits), self.w_group)

    def to_dict(self) -> dict:
        """The fields; the attention, KV and clip ones only when set, so runs without them keep the keys they had
        before they existed."""
        data = asdict(self)
        defaults = {"attention": False, "attention_scope": "head", "kv_bits": None, "a_clip": 1.0, "kv_clip": 1.0,
                    "kv_symmetric": None, "symmetric_grid": "restricted"}
        for field, default in defaults.items():
            if data[field] == default:
                data.pop(field)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BitSpec:
        return cls(**data)

    def __str__(self) -> str:
        return self.name


def bits_order(names: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """Bit-spec names sorted as in every table: most bits first (see :attr:`BitSpec.order_key`)."""
    return sorted(names, key=lambda n: BitSpec.parse(n).order_key)


FP = BitSpec()  # the unquantized baseline, W16A16
