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
- ``phi3``: LLaMA's block with q/k/v in one linear (``qkv_proj``) and gate/up in one (``gate_up_proj``), which
  ``prepare`` splits into child linears (``qkv_proj.q_proj``, ...; ``fused.FusedLinear``); RoPE may turn only part
  of each head (``partial_rotary_factor``: ``rotary_fraction``); one sliding window for all layers when set.
- ``qwen3_moe``: Qwen3's attention; the MLP routes each token to its top-k experts. ``prepare`` turns the stacked
  experts into one gate/up/down linear each behind a router linear (``fused.RoutedExperts``), named as in the
  checkpoints (``mlp.gate``, ``mlp.experts.<e>.gate_proj``). The router reads the MLP's input, so it is a consumer
  of ``mlp_in`` (every scale and rotation of that input moves into it) and stays FP (``routers``); each expert has
  its own up -> down pair (``mlp_outs``), and an expert's linears see only the tokens routed to it. A model with
  dense MLP layers among the sparse ones (``mlp_only_layers``, ``decoder_sparse_step`` > 1) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from harness.adapter.base import LlamaAdapter, ScalePair, config_value
from harness.adapter.fused import FusedLinear, RoutedExperts
from harness.errors import ConfigError


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


@dataclass(frozen=True)
class Phi3Adapter(LlamaAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("phi3",)
    attn_in: ScalePair = ScalePair("attn_in", "input_layernorm", tuple(f"self_attn.qkv_proj.{p}" for p in ("q_proj", "k_proj", "v_proj")))
    mlp_in: ScalePair = ScalePair("mlp_in", "post_attention_layernorm", ("mlp.gate_up_proj.gate_proj", "mlp.gate_up_proj.up_proj"))
    attn_out: ScalePair = ScalePair("attn_out", "self_attn.qkv_proj.v_proj", ("self_attn.o_proj",))
    mlp_out: ScalePair | None = ScalePair("mlp_out", "mlp.gate_up_proj.up_proj", ("mlp.down_proj",))

    @property
    def mlp_path(self) -> str:
        return self.mlp_out.consumers[0].rpartition(".")[0]

    def mlp_activation(self, layer: nn.Module) -> Any:
        return layer.get_submodule(self.mlp_path).activation_fn

    def prepare(self, model: nn.Module) -> nn.Module:
        """qkv_proj into q_proj, k_proj, v_proj (rows in that order) and gate_up_proj into gate_proj, up_proj (halves)."""
        heads, kv_heads, head_dim = self.attention_geometry(model)
        for layer in self.layers(model):
            attention, mlp = layer.get_submodule(self.attention_path), layer.get_submodule(self.mlp_path)
            if not isinstance(attention.qkv_proj, FusedLinear):
                kv = kv_heads * head_dim
                attention.qkv_proj = FusedLinear.split(attention.qkv_proj, {"q_proj": heads * head_dim, "k_proj": kv, "v_proj": kv})
            if not isinstance(mlp.gate_up_proj, FusedLinear):
                half = mlp.gate_up_proj.out_features // 2
                mlp.gate_up_proj = FusedLinear.split(mlp.gate_up_proj, {"gate_proj": half, "up_proj": half})
        return model


@dataclass(frozen=True)
class Qwen3MoeAdapter(Qwen3Adapter):
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_moe",)
    mlp_in: ScalePair = ScalePair("mlp_in", "post_attention_layernorm", ("mlp.gate",))
    mlp_out: ScalePair | None = None
    routers: tuple[str, ...] = ("mlp.gate",)

    @classmethod
    def from_config(cls, config: Any) -> LlamaAdapter:
        dense = config_value(config, "mlp_only_layers") or []
        step = config_value(config, "decoder_sparse_step") or 1
        if dense or step != 1:
            raise ConfigError(f"model: qwen3_moe with dense MLP layers among the sparse ones (mlp_only_layers {dense}, "
                              f"decoder_sparse_step {step}) is not supported; its blocks would differ in layout")
        experts = int(config_value(config, "num_experts") or 0)
        names = tuple(f"mlp.experts.{e}.{p}" for e in range(experts) for p in ("gate_proj", "up_proj"))
        base = super().from_config(config)
        return cls(rotary_fraction=base.rotary_fraction, experts=experts,
                   mlp_in=ScalePair("mlp_in", "post_attention_layernorm", (*cls.routers, *names)))

    @property
    def mlp_outs(self) -> tuple[ScalePair, ...]:
        return tuple(ScalePair("mlp_out", f"mlp.experts.{e}.up_proj", (f"mlp.experts.{e}.down_proj",)) for e in range(self.experts))

    def input_groups(self, pair: ScalePair) -> tuple[tuple[str, ...], ...]:
        if pair != self.mlp_in:
            return (pair.consumers,)
        experts = [name for name in pair.consumers if name not in self.routers]
        return (self.routers, *(tuple(experts[i:i + 2]) for i in range(0, len(experts), 2)))

    def intermediate_size(self, config: Any) -> int:
        return config_value(config, "moe_intermediate_size")

    def mlp_activation(self, layer: nn.Module) -> Any:
        return layer.get_submodule(self.mlp_path).experts[0].act_fn

    def prepare(self, model: nn.Module) -> nn.Module:
        """Each block's stacked experts (gate_up_proj, down_proj) and router as separate linears (``RoutedExperts``)."""
        for layer in self.layers(model):
            mlp = layer.get_submodule(self.mlp_path)
            if not isinstance(mlp, RoutedExperts):
                router, experts = mlp.gate, mlp.experts
                setattr(layer, self.mlp_path, RoutedExperts.from_stacked(
                    router.weight, experts.gate_up_proj, experts.down_proj, experts.act_fn, router.top_k, router.norm_topk_prob))
        return model


FAMILIES: tuple[type[LlamaAdapter], ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma3Adapter,
                                            Phi3Adapter, Qwen3MoeAdapter)
