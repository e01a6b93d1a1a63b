"""Quantized attention inputs: Q and K after RoPE and V, per token and per head, at the activation bits.

The official QLLM and OmniQuant LLaMA layers fake-quantize the inputs of the two attention
matmuls, not only the inputs of the linears: Q and K after RoPE, V, each with one dynamic
asymmetric range per (token, head) vector of length head_dim; the softmax output stays FP
(ModelTC/QLLM 653a329e models/int_llama_layer.py L262-263 and L285-289, main.py L195-222, the
16-bit early return in quantize/quantizer.py L102-105; OpenGVLab/OmniQuant 95fae1bd
models/int_llama_layer.py L141-142 and L160-162, main.py L282-309).

How it is wired, without copying transformers' attention: ``install(attn, quantizer)`` puts an
``ActQuantizer`` on a block's attention module as ``attn.qkv_quant`` and switches the model config
to the attention function registered here, which transformers calls with the module, Q/K (RoPE
applied) and V in (batch, heads, seqlen, head_dim) layout. The function fake-quantizes them over
the last dimension and hands them to transformers' SDPA attention. Modules without a quantizer
(blocks not quantized yet) go straight to SDPA, so a half-quantized model is fine.

The attention kernel stays the model's: a model loaded (or set) with ``attn_implementation="eager"``
gets transformers' eager attention behind the quantizer (``EAGER_IMPLEMENTATION``), every other one
SDPA. Eager is the explicit matmul / fp32 softmax / matmul of the official QLLM and OmniQuant layers:
with it ptqbench's RTN W4A4 model on smollm2-135m scored exactly the official code's perplexity (run on one machine), while
SDPA's different rounding alone moves that (broken, ppl ~2000) model by ~7%.

Grouped-query attention: here K and V are quantized *before* ``repeat_kv`` (SDPA repeats them),
the official layers after it. ``repeat_kv`` only copies whole heads, and the range is per
(token, head) vector, so every copy gets the range of its source head: the results are identical
(tests/harness/quant/test_attention.py checks it).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from harness.quant.quantizer import ActQuantizer

IMPLEMENTATION = "ptqbench_qkv_sdpa"
EAGER_IMPLEMENTATION = "ptqbench_qkv_eager"
ATTRIBUTE = "qkv_quant"


def quantized_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: fake-quantize Q, K, V (last dim = one head's vector), then SDPA."""
    quantizer = getattr(module, ATTRIBUTE, None)
    if quantizer is not None:
        query, key, value = quantizer(query), quantizer(key), quantizer(value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def causal_mask(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (1, 1, q_len, kv_len) additive causal mask (queries are the last q_len positions)."""
    mask = torch.full((q_len, kv_len), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(kv_len - q_len + 1)[None, None]


def quantized_eager(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantized_sdpa` with transformers' eager attention (for models loaded with ``eager``).

    A missing mask means causal, as SDPA's ``is_causal`` makes it (the block-wise engine and QLLM's
    search call blocks with ``attention_mask=None``); transformers' eager kernel alone would attend
    to every position.
    """
    quantizer = getattr(module, ATTRIBUTE, None)
    if quantizer is not None:
        query, key, value = quantizer(query), quantizer(key), quantizer(value)
    if attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True):
        attention_mask = causal_mask(query.shape[2], key.shape[2], query.dtype, query.device)
    return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Make ptqbench's kernels known to transformers (idempotent): before quantizing, and before a
    fresh process runs blocks restored from a checkpoint, whose configs already name them."""
    # each with the masks of its kernel (a name unknown to the mask interface would get no mask at
    # all, which breaks causality and padded batches such as lm-eval's)
    AttentionInterface.register(IMPLEMENTATION, quantized_sdpa)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    AttentionInterface.register(EAGER_IMPLEMENTATION, quantized_eager)
    AttentionMaskInterface.register(EAGER_IMPLEMENTATION, eager_mask)


def install(attn: nn.Module, bits: int, symmetric: bool) -> ActQuantizer:
    """Quantize ``attn``'s Q/K/V from now on; the model config (shared by all blocks) switches to our function
    (the eager one when the model computes attention with the eager kernel)."""
    register()
    quantizer = ActQuantizer(bits, symmetric)
    setattr(attn, ATTRIBUTE, quantizer)
    config = getattr(attn, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise TypeError(f"{type(attn).__name__} has no transformers config; cannot route its attention")
    eager = config._attn_implementation in ("eager", EAGER_IMPLEMENTATION)
    config._attn_implementation = EAGER_IMPLEMENTATION if eager else IMPLEMENTATION
    return quantizer


def attention_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """Every attention-input quantizer installed in ``model``."""
    return [q for m in model.modules() if isinstance(q := getattr(m, ATTRIBUTE, None), ActQuantizer)]
