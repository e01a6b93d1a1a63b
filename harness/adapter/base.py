"""The adapter of the LLaMA layout, and the operations every family's adapter performs for the methods.

Method code never hard-codes a module path, and never does the algebra of an equivalent transform
itself: it asks the adapter which linears a block has, which module feeds which linears (the pairs a
per-channel scale may move across), how to run one block on its own, and to perform the transforms:
fold a scale into a producer, fold a norm into its consumers, rotate a linear's input or output side
with its bias. Each operation leaves the FP function unchanged (tests/harness/adapter/ checks every
family). This layout: pre-norm RMSNorm, q/k/v/o attention with RoPE and grouped-query heads, gated
MLP (LLaMA-1/2/3, SmolLM, Mistral; Qwen2 adds q/k/v biases, Qwen3 QK-norms; see ``families.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from harness.errors import ConfigError


@dataclass(frozen=True)
class ScalePair:
    """A module whose output is the input of ``consumers``: a per-channel scale can move across it.

    ``producer`` is a norm (scale its effective weight) or a linear (scale its output rows and bias);
    dividing the producer's output by s and multiplying the consumers' input columns by s leaves the
    FP function unchanged.
    """

    name: str
    producer: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class LlamaAdapter:
    """Block layout of ``LlamaForCausalLM`` and the families that share it; the base of every adapter."""

    # the config.json model_type values this adapter describes
    model_types: ClassVar[tuple[str, ...]] = ("llama",)
    layers_path: str = "model.layers"
    attn_in: ScalePair = ScalePair("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    mlp_in: ScalePair = ScalePair("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
    attn_out: ScalePair = ScalePair("attn_out", "self_attn.v_proj", ("self_attn.o_proj",))
    mlp_out: ScalePair = ScalePair("mlp_out", "mlp.up_proj", ("mlp.down_proj",))
    # norms applied inside attention to each head of Q and K (Qwen3, Gemma3): () = none
    qk_norms: tuple[str, ...] = ()
    # norms on a sublayer's output before the residual add (Gemma3's post-attention and post-MLP norms)
    post_norms: tuple[str, ...] = ()
    # a norm multiplies by (offset + weight): 0 for LLaMA's RMSNorm, 1 for Gemma's
    norm_offset: float = 0.0

    @property
    def family(self) -> str:
        return self.model_types[0]

    @property
    def attention_path(self) -> str:
        """The attention module of a block (the parent of q/k/v)."""
        return self.attn_in.consumers[0].rpartition(".")[0]

    @property
    def mlp_path(self) -> str:
        """The MLP module of a block (the parent of gate/up/down)."""
        return self.mlp_in.consumers[0].rpartition(".")[0]

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every linear of a block, in execution order."""
        return (*self.attn_in.consumers, *self.attn_out.consumers, *self.mlp_in.consumers, *self.mlp_out.consumers)

    # -- where things are ---------------------------------------------------------------------------------

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def embed(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def tie_head(self, model: nn.Module) -> None:
        """Make the head share the embedding's weight (a tied model loaded piece by piece)."""
        self.lm_head(model).weight = self.embed(model).weight

    def attention_geometry(self, config: object) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, head_dim) from a model config (or a model, which has one).

        ``num_key_value_heads`` may be absent or None (older LLaMA configs): then every head has its
        own K/V (no grouped-query attention). ``head_dim`` may be absent or None likewise.
        """
        cfg = getattr(config, "config", config)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return heads, getattr(cfg, "num_key_value_heads", None) or heads, head_dim

    # -- running a block alone ----------------------------------------------------------------------------

    def position_embeddings(self, model: nn.Module, hidden: torch.Tensor) -> Any:
        """RoPE for a batch of full sequences starting at position 0: what :meth:`run_layer` takes (here
        (cos, sin); a family with several RoPEs returns them by layer type)."""
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return model.model.rotary_emb(hidden, positions)

    def position_embeddings_to(self, position_embeddings: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
        """:meth:`position_embeddings` moved to ``device`` (and ``dtype``, when given)."""
        if isinstance(position_embeddings, dict):
            return {k: self.position_embeddings_to(v, device, dtype) for k, v in position_embeddings.items()}
        return tuple(t.to(device=device, dtype=dtype or t.dtype) for t in position_embeddings)

    def layer_position_embeddings(self, layer: nn.Module, position_embeddings: Any) -> Any:
        """The RoPE of ``layer`` (its layer type's, for a family with several)."""
        if isinstance(position_embeddings, dict):
            return position_embeddings[layer.get_submodule(self.attention_path).layer_type]
        return position_embeddings

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        """One decoder block on its own (causal attention, its sliding window if it has one, no KV cache)."""
        out = layer(hidden, attention_mask=self._mask(layer, hidden), use_cache=False,
                    position_embeddings=self.layer_position_embeddings(layer, position_embeddings))
        return out[0] if isinstance(out, tuple) else out

    def run_attention(self, layer: nn.Module, normed: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        """A block's attention alone on its normed input: o_proj's output, before any post-norm and the residual add."""
        attention = layer.get_submodule(self.attention_path)
        out = attention(hidden_states=normed, attention_mask=self._mask(layer, normed),
                        position_embeddings=self.layer_position_embeddings(layer, position_embeddings))
        return out[0] if isinstance(out, tuple) else out

    def sliding_window(self, layer: nn.Module) -> int | None:
        """The block's attention window (keys at distance < window), None = full causal attention."""
        attention = layer.get_submodule(self.attention_path)
        if hasattr(attention, "sliding_window"):  # set per layer (Qwen2/3, Gemma3: None on full-attention layers)
            return attention.sliding_window
        return getattr(getattr(attention, "config", None), "sliding_window", None)  # Mistral, Phi-3: one for all

    def _mask(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        # attention_mask=None lets SDPA use its causal kernel (every sequence here is full length);
        # transformers' eager kernel has no implicit mask, and a window shorter than the sequence needs one.
        window = self.sliding_window(layer)
        window = window if window is not None and window < hidden.shape[1] else None
        kernel = getattr(getattr(layer.get_submodule(self.attention_path), "config", None), "_attn_implementation", None)
        if kernel != "eager" and window is None:
            return None
        return causal_mask(hidden.shape[1], hidden.shape[1], hidden.dtype, hidden.device, window=window)

    # -- equivalent transforms (each exact in FP) ---------------------------------------------------------

    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        """The per-channel factor a norm multiplies by: its weight (plus the family's offset), in at least float32."""
        return _wide(norm.weight.detach()) + self.norm_offset

    def set_norm_scale(self, norm: nn.Module, scale: torch.Tensor) -> None:
        """Make ``norm`` multiply by ``scale`` (Gemma's offset norm stores scale - 1)."""
        norm.weight.data = (scale - self.norm_offset).to(norm.weight.dtype)

    def fold_scale(self, layer: nn.Module, pair: ScalePair, scale: torch.Tensor) -> None:
        """Divide ``pair``'s producer output by ``scale`` and multiply its consumers' input columns by it.

        The producer is a norm (its effective weight divided; a norm bias too) or a linear (its output rows and
        bias divided). Exact in FP: the consumers see the same products. The one place a per-channel scale moves.
        """
        producer = layer.get_submodule(pair.producer)
        s = _wide(scale.detach().to(producer.weight.device, torch.promote_types(scale.dtype, producer.weight.dtype)))
        if isinstance(producer, nn.Linear):
            self.scale_rows(producer, 1 / s)
        else:
            self.set_norm_scale(producer, self.norm_scale(producer) / s)
            if getattr(producer, "bias", None) is not None:
                producer.bias.data = (_wide(producer.bias) / s).to(producer.bias.dtype)
        for name in pair.consumers:
            self.scale_columns(layer.get_submodule(name), s)

    def fold_norm(self, layer: nn.Module, pair: ScalePair) -> None:
        """Move a norm's per-channel factor into its consumers' input columns; the norm then only normalises."""
        norm = layer.get_submodule(pair.producer)
        if getattr(norm, "bias", None) is not None:
            raise ConfigError(f"model: the {self.family} norm {pair.producer} has a bias, which cannot be folded into "
                              f"{', '.join(pair.consumers)}")
        scale = self.norm_scale(norm)
        for name in pair.consumers:
            self.scale_columns(layer.get_submodule(name), scale)
        self.set_norm_scale(norm, torch.ones_like(scale))

    @staticmethod
    def scale_rows(linear: nn.Linear, scale: torch.Tensor) -> None:
        """Multiply the linear's output channels (weight rows and bias) by ``scale``."""
        s = scale.to(linear.weight.device)
        linear.weight.data = (_wide(linear.weight) * s[:, None]).to(linear.weight.dtype)
        if linear.bias is not None:
            linear.bias.data = (_wide(linear.bias) * s).to(linear.bias.dtype)

    @staticmethod
    def scale_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
        """Multiply the linear's input channels (weight columns) by ``scale``."""
        s = scale.to(linear.weight.device)
        linear.weight.data = (_wide(linear.weight) * s[None, :]).to(linear.weight.dtype)

    @staticmethod
    def rotate_input(linear: nn.Linear, q: torch.Tensor) -> None:
        """The linear reads ``x @ q`` instead of ``x``: W <- W q (float64 products; the bias is unchanged)."""
        w = linear.weight.data
        linear.weight.data = (w.double() @ q.to(w.device, torch.float64)).to(w.dtype)

    @staticmethod
    def rotate_output(linear: nn.Linear, q: torch.Tensor) -> None:
        """The linear writes ``y @ q`` instead of ``y``: W <- q^T W, and its bias b <- b q."""
        w = linear.weight.data
        q64 = q.to(w.device, torch.float64)
        linear.weight.data = (q64.T @ w.double()).to(w.dtype)
        if linear.bias is not None:
            linear.bias.data = (linear.bias.double() @ q64).to(linear.bias.dtype)

    # -- what a family cannot do --------------------------------------------------------------------------

    def refusal(self, operation: str) -> str | None:
        """Why this family cannot perform ``operation`` exactly (None: it can). Operations: ``fold_scale:<pair>``,
        ``fold_norm``, ``rotate_residual``, ``rotate_heads``."""
        return None


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 where it is float64: the transforms' arithmetic never loses a model's precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def causal_mask(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                window: int | None = None) -> torch.Tensor:
    """The (1, 1, q_len, kv_len) additive causal mask (queries are the last q_len positions); with ``window``
    a query sees only keys at distance < window (transformers' sliding-window semantics)."""
    mask = torch.full((q_len, kv_len), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask = mask.triu(kv_len - q_len + 1)
    if window is not None:
        mask = mask + torch.full_like(mask, torch.finfo(dtype).min).tril(kv_len - q_len - window)
        mask = mask.clamp(min=torch.finfo(dtype).min)
    return mask[None, None]
