"""Model adapters: where a model family keeps its blocks, norms and linears.

Method code never hard-codes a module path. It asks the adapter which linears a block has, which
norm feeds which linears (the pairs an equivalent transform may scale), and how to run one block
on its own. One adapter covers the LLaMA family (LLaMA-1/2/3, SmolLM, Mistral-style blocks):
pre-norm RMSNorm, q/k/v/o attention with RoPE and grouped-query heads, gated SiLU MLP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.errors import ConfigError


@dataclass(frozen=True)
class ScalePair:
    """A module whose output is the input of ``consumers``: a per-channel scale can move across it.

    ``producer`` is an RMSNorm (scale its weight) or a linear (scale its output rows); dividing the
    producer's output by s and multiplying the consumers' input columns by s leaves the FP function
    unchanged.
    """

    name: str
    producer: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class LlamaAdapter:
    """Block layout of ``LlamaForCausalLM`` and architecturally identical families."""

    layers_path: str = "model.layers"
    attn_in: ScalePair = ScalePair("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    mlp_in: ScalePair = ScalePair("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
    attn_out: ScalePair = ScalePair("attn_out", "self_attn.v_proj", ("self_attn.o_proj",))
    mlp_out: ScalePair = ScalePair("mlp_out", "mlp.up_proj", ("mlp.down_proj",))

    @property
    def attention_path(self) -> str:
        """The attention module of a block (the parent of q/k/v)."""
        return self.attn_in.consumers[0].rpartition(".")[0]

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every linear of a block, in execution order."""
        return (*self.attn_in.consumers, *self.attn_out.consumers, *self.mlp_in.consumers, *self.mlp_out.consumers)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def embed(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def position_embeddings(self, model: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) for a batch of full sequences starting at position 0."""
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return model.model.rotary_emb(hidden, positions)

    @property
    def mlp_path(self) -> str:
        """The MLP module of a block (the parent of gate/up/down)."""
        return self.mlp_in.consumers[0].rpartition(".")[0]

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One decoder block on its own (causal attention, no KV cache)."""
        out = layer(hidden, attention_mask=self._mask(layer, hidden), position_embeddings=position_embeddings, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def run_attention(self, layer: nn.Module, normed: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """A block's attention alone on its normed input: o_proj's output, before the residual add."""
        attention = layer.get_submodule(self.attention_path)
        out = attention(hidden_states=normed, attention_mask=self._mask(layer, normed), position_embeddings=position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    def _mask(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        # attention_mask=None lets SDPA use its causal kernel (every sequence here is full length);
        # transformers' eager kernel has no implicit mask, so an eager block gets an explicit one.
        if getattr(getattr(layer.get_submodule(self.attention_path), "config", None), "_attn_implementation", None) != "eager":
            return None
        return causal_mask(hidden.shape[1], hidden.shape[1], hidden.dtype, hidden.device)

    def attention_geometry(self, config: object) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, head_dim) from a model config (or a model, which has one).

        ``num_key_value_heads`` may be absent or None (older LLaMA configs): then every head has its
        own K/V (no grouped-query attention). ``head_dim`` may be absent or None likewise.
        """
        cfg = getattr(config, "config", config)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return heads, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


# model_type values whose blocks have exactly the LLaMA layout above.
_LLAMA_LIKE = ("llama", "mistral")
SUPPORTED_MODEL_TYPES = _LLAMA_LIKE  # checked against a model's config.json before any work (harness.run.preflight)


def get_adapter(model: nn.Module) -> LlamaAdapter:
    """The adapter for ``model``; a clear error for families ptqbench does not describe."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _LLAMA_LIKE:
        return LlamaAdapter()
    raise ConfigError(f"model: model_type {model_type!r} is not supported; supported families: {_LLAMA_LIKE}")


def causal_mask(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (1, 1, q_len, kv_len) additive causal mask (queries are the last q_len positions)."""
    mask = torch.full((q_len, kv_len), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(kv_len - q_len + 1)[None, None]
