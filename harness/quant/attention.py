"""Quantized attention inputs: Q and K after RoPE and V, per token and per head, at the activation bits.

The official QLLM and OmniQuant LLaMA layers fake-quantize the inputs of the two attention
matmuls, not only the inputs of the linears: Q and K after RoPE, V, each with one dynamic
asymmetric range per (token, head) vector of length head_dim; the softmax output stays FP
(ModelTC/QLLM 653a329e models/int_llama_layer.py L262-263 and L285-289, main.py L195-222, the
16-bit early return in quantize/quantizer.py L102-105; OpenGVLab/OmniQuant 95fae1bd
models/int_llama_layer.py L141-142 and L160-162, main.py L282-309).

How it is wired, without copying transformers' attention: ``install(attn, spec)`` puts an
``AttentionQuantizer`` (one ``ActQuantizer`` each for Q, K and V) on a block's attention module as
``attn.qkv_quant`` and switches the model config
to the attention function registered here, which transformers calls with the module, Q/K (RoPE
applied) and V in (batch, heads, seqlen, head_dim) layout. The function fake-quantizes them over
the last dimension and hands them to transformers' SDPA attention. Modules without a quantizer
(blocks not quantized yet) go straight to SDPA, so a half-quantized model is fine.

The attention kernel stays the model's: a model loaded (or set) with ``attn_implementation="eager"``
gets its family's eager attention behind the quantizer (``EAGER_IMPLEMENTATION``: the
``eager_attention_forward`` of the attention module's own modeling file, so a family's softcapping or
default scaling is kept), every other one SDPA (the module passes its own ``scaling``, Gemma's
``query_pre_attn_scalar``, and the mask carries its sliding window). Eager is the explicit matmul / fp32 softmax / matmul of the official QLLM and OmniQuant layers:
with it ptqbench's RTN W4A4 model on smollm2-135m scored exactly the official code's perplexity (run on one machine), while
SDPA's different rounding alone moves that (broken, ppl ~2000) model by ~7%.

KV cache (a bit spec with a KV part, ``W4A4KV4``): K and V take the KV bits and clip ratio, Q the
activation bits when ``attention`` is set and stays FP otherwise (QuaRot). ``rotate_qk`` applies the
Hadamard of the head dimension to Q and K first (QuaRot's online rotation for the K cache; R_K ⊗ H_m of
``qk_seed`` for a head dimension without one, ``harness.quant.hadamard.rotation_transform``): exact in FP,
since Q Kᵀ = (Q H)(K H)ᵀ. A method may put any pair of online transforms there (``set_qk_transforms``:
FlatQuant's learned Q M^-T and K M) and learned clip ratios on the three quantizers (``set_clip``).

An exported model keeps these quantizers: ``describe(attn)`` says what ``install`` put on a block's attention
(its bit spec, ``rotate_qk``, the Q/K transforms' recipes and the learned clips), ``reinstall(attn, data)`` puts the same quantizers back on a reloaded one, and
``kernel_of(config)`` names the transformers kernel behind ptqbench's routing (``sdpa`` or ``eager``), which the
reloaded model needs too (harness/export/).

Grouped-query attention: here K and V are quantized *before* ``repeat_kv`` (SDPA repeats them),
the official layers after it. ``repeat_kv`` only copies whole heads, and the range is per
(token, head) vector, so every copy gets the range of its source head: the results are identical
(tests/harness/quant/test_attention.py checks it).
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from harness.adapter import causal_mask
from harness.bits import BitSpec
from harness.quant.hadamard import rotation_transform
from harness.quant.online import online_transform
from harness.quant.quantizer import ActQuantizer

IMPLEMENTATION = "ptqbench_qkv_sdpa"
EAGER_IMPLEMENTATION = "ptqbench_qkv_eager"
ATTRIBUTE = "qkv_quant"


class AttentionQuantizer(nn.Module):
    """The quantizers of one attention's Q, K (after RoPE) and V, each per token and head."""

    rotate_qk: bool = False  # a class default, so a block pickled without it still runs
    qk_seed: int = 0  # the seed of R_K where the head dimension has no Hadamard matrix
    spec: BitSpec | None = None  # the spec ``install`` built it from (None: a block pickled before it was recorded)

    def __init__(self, q: ActQuantizer, k: ActQuantizer, v: ActQuantizer) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v
        # online transforms of Q and K after RoPE, before their quantizers (``set_qk_transforms``), and the learned
        # clip ratios of the quantizers (``set_clip``): read with getattr, a block pickled without them has none
        self.q_transform: nn.Module | None = None
        self.k_transform: nn.Module | None = None
        self.clips: dict[str, tuple[float, float]] = {}

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.rotate_qk:
            query, key = (rotation_transform(t.float(), self.qk_seed).to(t.dtype) for t in (query, key))
        q_transform, k_transform = getattr(self, "q_transform", None), getattr(self, "k_transform", None)
        if q_transform is not None:
            query = q_transform(query)
        if k_transform is not None:
            key = k_transform(key)
        return self.q(query), self.k(key), self.v(value)

    def extra_repr(self) -> str:
        return "rotate_qk=True" if self.rotate_qk else ""


def set_qk_transforms(quantizer: AttentionQuantizer, q_transform: nn.Module, k_transform: nn.Module) -> None:
    """Transform Q and K after RoPE (and ``rotate_qk``) before they are quantized: Q -> q_transform(Q), K ->
    k_transform(K). Exact in FP when one is the other's inverse transpose, Q M^-T (K M)ᵀ = Q Kᵀ (FlatQuant's K
    transform: the K cache is quantized as K M). Online transforms (``harness.quant.online``) export with the model."""
    quantizer.q_transform, quantizer.k_transform = q_transform, k_transform


def set_clip(quantizer: AttentionQuantizer, which: str, clip_max: float, clip_min: float) -> None:
    """Make the quantizer of ``which`` (q, k or v) its spec's, with its per-token range's max times ``clip_max`` and
    min times ``clip_min`` (learned ratios, FlatQuant's LAC) in place of the spec's clip ratio; recorded, so the
    quantizer stays one its spec and ``clips`` describe (:func:`describe`)."""
    if which not in ("q", "k", "v"):
        raise ValueError(f"set_clip: {which!r} is not one of q, k, v")
    fresh = getattr(_quantizer(quantizer.spec), which)
    fresh.clip_ratio, fresh.clip_ratio_min = float(clip_max), float(clip_min)
    setattr(quantizer, which, fresh)
    clips = dict(getattr(quantizer, "clips", None) or {})
    clips[which] = (float(clip_max), float(clip_min))
    quantizer.clips = clips


def _quantized(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    quantizer = getattr(module, ATTRIBUTE, None)
    if quantizer is None:
        return query, key, value
    if isinstance(quantizer, ActQuantizer):  # a block checkpointed before AttentionQuantizer existed
        return quantizer(query), quantizer(key), quantizer(value)
    return quantizer(query, key, value)


def quantized_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: fake-quantize Q, K, V (last dim = one head's vector), then SDPA."""
    query, key, value = _quantized(module, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def quantized_eager(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantized_sdpa` with transformers' eager attention (for models loaded with ``eager``).

    A missing mask means causal, as SDPA's ``is_causal`` makes it (the block-wise engine and QLLM's
    search call blocks with ``attention_mask=None``); transformers' eager kernel alone would attend
    to every position.
    """
    query, key, value = _quantized(module, query, key, value)
    if attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True):
        attention_mask = causal_mask(query.shape[2], key.shape[2], query.dtype, query.device)
    return eager_kernel(module)(module, query, key, value, attention_mask, **kwargs)


def eager_kernel(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """transformers' eager attention of ``module``'s family: the ``eager_attention_forward`` its modeling file
    defines (every family's has one; Gemma's softcaps, LLaMA's does not)."""
    kernel = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if kernel is None:
        raise TypeError(f"{type(module).__name__} comes from {type(module).__module__}, which defines no "
                        "eager_attention_forward; load the model with the sdpa kernel")
    return kernel


def register() -> None:
    """Make ptqbench's kernels known to transformers (idempotent): before quantizing, and before a
    fresh process runs blocks restored from a checkpoint, whose configs already name them."""
    # each with the masks of its kernel (a name unknown to the mask interface would get no mask at
    # all, which breaks causality and padded batches such as lm-eval's)
    AttentionInterface.register(IMPLEMENTATION, quantized_sdpa)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    AttentionInterface.register(EAGER_IMPLEMENTATION, quantized_eager)
    AttentionMaskInterface.register(EAGER_IMPLEMENTATION, eager_mask)


def _quantizer(spec: BitSpec) -> AttentionQuantizer:
    """The Q, K and V quantizers ``spec`` asks for (see the module docstring for which bits each takes)."""
    q_bits = spec.a_bits if spec.attention else 16
    kv_bits, kv_clip = (q_bits, spec.a_clip) if spec.kv_bits is None else (spec.kv_bits, spec.kv_clip)
    quantizer = AttentionQuantizer(ActQuantizer(q_bits, spec.a_symmetric, spec.a_clip, spec.full_grid),
                                   *(ActQuantizer(kv_bits, spec.kv_sym, kv_clip, spec.full_grid) for _ in range(2)))
    quantizer.spec = spec
    return quantizer


def install(attn: nn.Module, spec: BitSpec) -> AttentionQuantizer:
    """Quantize ``attn``'s Q/K/V from now on as ``spec`` says; the model config (shared by all blocks) switches to
    our function (the eager one when the model computes attention with the eager kernel)."""
    register()
    quantizer = _quantizer(spec)
    setattr(attn, ATTRIBUTE, quantizer)
    config = getattr(attn, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise TypeError(f"{type(attn).__name__} has no transformers config; cannot route its attention")
    eager = config._attn_implementation in ("eager", EAGER_IMPLEMENTATION)
    config._attn_implementation = EAGER_IMPLEMENTATION if eager else IMPLEMENTATION
    return quantizer


def attention_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """Every attention-input quantizer installed in ``model``."""
    found = []
    for m in model.modules():
        q = getattr(m, ATTRIBUTE, None)
        found += [q] if isinstance(q, ActQuantizer) else [q.q, q.k, q.v] if isinstance(q, AttentionQuantizer) else []
    return found


def quantizer_dict(q: ActQuantizer) -> dict:
    """What decides an activation quantizer's output, as JSON data (``ActQuantizer(**d)`` rebuilds it, ``enabled``
    aside: it follows the bits)."""
    data = {"bits": q.bits, "symmetric": q.symmetric, "clip_ratio": q.clip_ratio, "full_grid": q.full_grid}
    if q.clip_ratio_min is not None:
        data["clip_ratio_min"] = q.clip_ratio_min
    return data


def _state(quantizer: AttentionQuantizer) -> list[tuple[dict, bool]]:
    return [(quantizer_dict(q), q.enabled) for q in (quantizer.q, quantizer.k, quantizer.v)]


def _expected(quantizer: AttentionQuantizer) -> AttentionQuantizer:
    """What ``install`` and the recorded ``set_clip`` calls build: the quantizers ``quantizer`` must have."""
    built = _quantizer(quantizer.spec)
    for which, (clip_max, clip_min) in (getattr(quantizer, "clips", None) or {}).items():
        getattr(built, which).clip_ratio, getattr(built, which).clip_ratio_min = clip_max, clip_min
    return built


def describe(attn: nn.Module) -> dict | None:
    """The quantizer ``install`` put on ``attn`` as JSON data, ``{"spec": BitSpec.to_dict(), "rotate_qk": bool}``
    plus, where set, ``"clips": {"k": [max, min], ...}`` and the recipes of ``"q_transform"`` / ``"k_transform"``
    (None: ``attn`` has none); :func:`reinstall` puts the same one back.

    Raises ``ValueError`` (one line, for the exporter to name the module) when the installed quantizers are not
    the ones their spec (and their recorded clips) build, so a saved model never quantizes Q/K/V differently from
    the model it came from.
    """
    quantizer = getattr(attn, ATTRIBUTE, None)
    if quantizer is None:
        return None
    spec = getattr(quantizer, "spec", None)
    if not isinstance(quantizer, AttentionQuantizer) or spec is None:
        raise ValueError("its Q/K/V quantizer does not record its bit spec (a block checkpointed by an earlier "
                         "ptqbench); quantize the run again")
    if _state(quantizer) != _state(_expected(quantizer)):
        raise ValueError(f"its Q/K/V quantizers were changed after install, so the bit spec {spec.name} does not "
                         "describe them")
    data = {"spec": spec.to_dict(), "rotate_qk": bool(quantizer.rotate_qk)}
    if quantizer.qk_seed:
        data["qk_seed"] = quantizer.qk_seed
    clips = getattr(quantizer, "clips", None) or {}
    if clips:
        data["clips"] = {which: list(ratios) for which, ratios in sorted(clips.items())}
    for name in ("q_transform", "k_transform"):
        transform = getattr(quantizer, name, None)
        if transform is not None:
            if transform.state_dict():  # the manifest holds the recipe alone (harness.quant.online)
                raise ValueError(f"its {name} holds tensors its recipe (to_dict) does not rebuild")
            data[name] = transform.to_dict()
    return data


def reinstall(attn: nn.Module, data: dict) -> AttentionQuantizer:
    """Put back on ``attn`` the quantizer :func:`describe` described."""
    quantizer = install(attn, BitSpec.from_dict(data["spec"]))
    quantizer.rotate_qk = bool(data.get("rotate_qk", False))
    quantizer.qk_seed = int(data.get("qk_seed", 0))
    for which, (clip_max, clip_min) in data.get("clips", {}).items():
        set_clip(quantizer, which, clip_max, clip_min)
    if "q_transform" in data or "k_transform" in data:
        set_qk_transforms(quantizer, *(None if name not in data else online_transform(data[name])
                                       for name in ("q_transform", "k_transform")))
    return quantizer


def extends_version_2(data: dict) -> bool:
    """Whether a :func:`describe` entry holds what a reader of ptqbench's format version 2 would drop."""
    return any(key in data for key in ("clips", "q_transform", "k_transform"))


def kernel_of(config: object) -> str | None:
    """The transformers attention kernel a model config computes with, ptqbench's routing seen through (``sdpa``
    for ``ptqbench_qkv_sdpa``, ``eager`` for ``ptqbench_qkv_eager``); None when the config names none."""
    name = getattr(config, "_attn_implementation", None)
    return {IMPLEMENTATION: "sdpa", EAGER_IMPLEMENTATION: "eager"}.get(name, name)
