"""The model families beyond LLaMA's exact layout: what each changes in the block, as data where it can be.

- ``mistral``: LLaMA's block; the sliding window of its config (``LlamaAdapter.sliding_window``).
- ``qwen2``: LLaMA's block with q/k/v biases (a scale or rotation of a linear's output side takes its bias
  along: ``scale_rows``, ``rotate_output``); sliding-window layers where the config asks for them.
- ``qwen3``: Qwen2's block without biases, with an RMSNorm on each head of Q and K (``qk_norms``). A
  per-head norm commutes with no per-channel scale or rotation of Q's or K's channels, so transforms of
  q_proj/k_proj outputs are refused (``transform_qk``); their inputs (the residual side) transform freely.
- ``gemma3_text``: offset RMSNorms (x * (1 + w): ``norm_offset``, which every norm operation takes into
  account), a norm after attention and after the MLP before each residual add (``post_norms``: the residual
  stream cannot be rotated offline, ``rotate_residual``), QK-norms, an embedding scaled by sqrt(hidden),
  attention scaled by ``query_pre_attn_scalar``, sliding-window layers with their own RoPE
  (:meth:`Gemma3Adapter.position_embeddings` by layer type).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from harness.adapter.base import LlamaAdapter, ScalePair


@dataclass(frozen=True)
class MistralAdapter(LlamaAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("mistral",)


@dataclass(frozen=True)
class Qwen2Adapter(LlamaAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("qwen2",)


@dataclass(frozen=True)
class Qwen3Adapter(LlamaAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("qwen3",)
    qk_norms: tuple[str, ...] = ("self_attn.q_norm", "self_attn.k_norm")


@dataclass(frozen=True)
class Gemma3Adapter(LlamaAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("gemma3_text",)
    mlp_in: ScalePair = ScalePair("mlp_in", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
    qk_norms: tuple[str, ...] = ("self_attn.q_norm", "self_attn.k_norm")
    post_norms: tuple[str, ...] = ("post_attention_layernorm", "post_feedforward_layernorm")
    norm_offset: float = 1.0

    def position_embeddings(self, model: nn.Module, hidden: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One RoPE per layer type: local (sliding-window) layers use their own base frequency."""
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = model.model.rotary_emb
        return {t: rotary(hidden, positions, t) for t in sorted(set(model.config.layer_types))}


FAMILIES: tuple[type[LlamaAdapter], ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma3Adapter)
