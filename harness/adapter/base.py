"""The adapter of the LLaMA layout, and the operations every family's adapter performs for the methods.

Method code never hard-codes a module path, and never does the algebra of an equivalent transform
itself: it asks the adapter which linears a block has, which module feeds which linears (the pairs a
per-channel scale may move across), how to run one block or its attention on its own, what a family
cannot do exactly (``refusal``), and to perform the transforms (``transforms.py``: fold a scale or a
shift into a producer, fold a norm into its consumers, rotate a linear's input or output side with its
bias). Each operation leaves the FP function unchanged (tests/harness/adapter/ checks every family).
A family that fuses or stacks projections in one tensor is first ``prepare``d into separate linears
(``fused.py``), so the names always point at one ``nn.Linear`` each.
This layout: pre-norm RMSNorm, q/k/v/o attention with RoPE and grouped-query heads, gated MLP
(LLaMA-1/2/3, SmolLM, Mistral; Qwen2 adds q/k/v biases, Qwen3 QK-norms, Phi-3 fused projections,
Qwen3-MoE routed experts; see ``families.py``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapter.transforms import EquivalentTransforms, ScalePair


@dataclass(frozen=True)
class LlamaAdapter(EquivalentTransforms):
    """Block layout of ``LlamaForCausalLM`` and the families that share it; the base of every adapter."""

    # the config.json model_type values this adapter describes
    model_types: ClassVar[tuple[str, ...]] = ("llama",)
    layers_path: str = "model.layers"
    attn_in: ScalePair = ScalePair("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    mlp_in: ScalePair = ScalePair("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
    attn_out: ScalePair = ScalePair("attn_out", "self_attn.v_proj", ("self_attn.o_proj",))
    # None where each expert has its own (``mlp_outs``)
    mlp_out: ScalePair | None = ScalePair("mlp_out", "mlp.up_proj", ("mlp.down_proj",))
    # norms applied inside attention to each head of Q and K (Qwen3, Gemma3): () = none
    qk_norms: tuple[str, ...] = ()
    # norms on a sublayer's output before the residual add (Gemma3's post-attention and post-MLP norms)
    post_norms: tuple[str, ...] = ()
    # a norm multiplies by (offset + weight): 0 for LLaMA's RMSNorm, 1 for Gemma's
    norm_offset: float = 0.0
    # the fraction of each head's channels RoPE turns (the first ones; config partial_rotary_factor, Phi-3 / Phi-4)
    rotary_fraction: float = 1.0
    # modules that read a pair's input and stay FP, never quantized (a MoE router, in mlp_in's consumers)
    routers: tuple[str, ...] = ()
    # routed experts per MLP (0: one dense MLP)
    experts: int = 0

    @classmethod
    def from_config(cls, config: Any) -> LlamaAdapter:
        """The adapter of a model with ``config`` (a transformers config or a config.json dict): what its layout
        depends on beyond the family (here the rotary fraction)."""
        rope = config_value(config, "rope_parameters") or {}
        fraction = (rope.get("partial_rotary_factor") if isinstance(rope, Mapping) else None) \
            or config_value(config, "partial_rotary_factor") or 1.0
        return cls(rotary_fraction=float(fraction))

    @property
    def family(self) -> str:
        return self.model_types[0]

    @property
    def attention_path(self) -> str:
        """The attention module of a block (the parent of o_proj)."""
        return self.attn_out.consumers[0].rpartition(".")[0]

    @property
    def mlp_path(self) -> str:
        """The MLP module of a block (the parent of gate/up/down, or of a MoE's router and experts)."""
        return self.mlp_in.consumers[0].rpartition(".")[0]

    @property
    def mlp_outs(self) -> tuple[ScalePair, ...]:
        """up_proj -> down_proj of every MLP of the block: ``mlp_out``, or one per expert."""
        return (self.mlp_out,)

    @property
    def scale_pairs(self) -> tuple[ScalePair, ...]:
        """Every pair of the block: attn_in, attn_out, mlp_in and the mlp_outs."""
        return (self.attn_in, self.attn_out, self.mlp_in, *self.mlp_outs)

    def input_groups(self, pair: ScalePair) -> tuple[tuple[str, ...], ...]:
        """``pair``'s consumers grouped by the tokens they read: all of them (one group), except where a router sends
        each token to some experts (the router alone, then each expert's gate/up). A group's first consumer's
        recorded input stands for the group."""
        return (pair.consumers,)

    def intermediate_size(self, config: Any) -> int:
        """The width of down_proj's input: of the MLP, or of one expert."""
        return config_value(config, "intermediate_size")

    def rotary_dim(self, head_dim: int) -> int:
        """How many of a head's channels RoPE turns: channel d with d + rotary_dim / 2 for d < rotary_dim / 2."""
        return int(head_dim * self.rotary_fraction)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Put separate linears where the family fuses or stacks projections (``fused.py``), in place; exact, and
        nothing to do for this layout. Every loader calls it, and ``Method.apply``; a prepared model is left alone."""
        return model

    @property
    def qkv_names(self) -> tuple[str, str, str]:
        """q_proj, k_proj, v_proj: ``attn_in``'s consumers, in that order."""
        q, k, v = self.attn_in.consumers
        return q, k, v

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every linear of a block that is quantized (not the ``routers``), in execution order."""
        names = (*self.attn_in.consumers, *self.attn_out.consumers, *self.mlp_in.consumers,
                 *(name for pair in self.mlp_outs for name in pair.consumers))
        return tuple(name for name in names if name not in self.routers)

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

    def mlp_activation(self, layer: nn.Module) -> Any:
        """The activation of the block's gated MLP, act(gate) * up (LLaMA's SiLU, Gemma's tanh-approximated GELU)."""
        return layer.get_submodule(self.mlp_path).act_fn

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

    def attention_inputs(self, layer: nn.Module, normed: torch.Tensor, position_embeddings: Any) -> dict[str, Any]:
        """What a block's attention module takes besides its input (``normed``): the layer's RoPE and mask."""
        return {"attention_mask": self._mask(layer, normed),
                "position_embeddings": self.layer_position_embeddings(layer, position_embeddings)}

    def run_attention(self, layer: nn.Module, normed: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        """A block's attention alone on its normed input: o_proj's output, before any post-norm and the residual add."""
        attention = layer.get_submodule(self.attention_path)
        out = attention(hidden_states=normed, **self.attention_inputs(layer, normed, position_embeddings))
        return out[0] if isinstance(out, tuple) else out

    def attention_context(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          position_embeddings: Any) -> torch.Tensor:
        """o_proj's input from the block's q/k/v projections (batch, seqlen, width each), as its attention computes it:
        the per-head norms (``qk_norms``), the layer's RoPE, each KV head shared by its query heads, causal
        softmax(Q K^T * scaling) V within the layer's window; (batch, seqlen, heads * head_dim).

        For searches that score many candidate weights in one batch (OS+), where the module itself cannot run.
        """
        attention = layer.get_submodule(self.attention_path)
        heads, kv_heads, head_dim = self.attention_geometry(attention.config)
        batch, seqlen, _ = q.shape
        q, k, v = (t.view(batch, seqlen, -1, head_dim).transpose(1, 2) for t in (q, k, v))
        if self.qk_norms:
            q_norm, k_norm = (layer.get_submodule(name) for name in self.qk_norms)
            q, k = q_norm(q), k_norm(k)
        cos, sin = (t.unsqueeze(1) for t in self.layer_position_embeddings(layer, position_embeddings))  # broadcast over heads
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (_rope(k, cos, sin), v))
        window = self.sliding_window(layer)
        mask = causal_mask(seqlen, seqlen, q.dtype, q.device, window) if window is not None and window < seqlen else None
        out = F.scaled_dot_product_attention(_rope(q, cos, sin), k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=getattr(attention, "scaling", None))
        return out.transpose(1, 2).reshape(batch, seqlen, heads * head_dim)

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

    # -- what a family cannot do --------------------------------------------------------------------------

    def refusal(self, operation: str) -> str | None:
        """Why this family cannot perform ``operation`` exactly (None: it can), one clause for a one-line error:

        - ``rotate_residual``: rotate the residual stream offline (every writer writes h Q, every reader reads
          through W Q);
        - ``transform_qk``: a per-channel scale or a rotation of q_proj's and k_proj's outputs (OmniQuant's q/k scale);
        - ``mlp_site``: the MLP as one site, gate/up -> act(gate) * up -> down_proj, whose output a search computes
          from those weights alone (OS+'s and QLLM's site functions).

        All follow from the layout: a norm between a sublayer's output and the residual add (``post_norms``)
        normalises h Q differently from h; a norm on each head of Q and K (``qk_norms``) normalises scaled channels;
        a router (``routers``) sends each token through some experts' gate/up/down only.
        """
        if operation == "rotate_residual" and self.post_norms:
            return (f"its norms on each sublayer's output before the residual add ({', '.join(self.post_norms)}) do not commute "
                    "with a rotation of the residual stream")
        if operation == "transform_qk" and self.qk_norms:
            return (f"its norm on each head of Q and K ({', '.join(n.rpartition('.')[2] for n in self.qk_norms)}) commutes "
                    "with no per-channel scale or rotation of q_proj's and k_proj's outputs")
        if operation == "mlp_site" and self.routers:
            return (f"its router ({', '.join(self.routers)}) sends each token to some of its {self.experts} experts, each "
                    "with its own gate/up/down: no single gated-MLP site")
        return None


def config_value(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the rotate-half layout on the first cos.shape[-1] channels of each head (channels d and
    d + rotary / 2 turn together); the rest pass unchanged (partial RoPE)."""
    rotary = cos.shape[-1]
    turned, kept = x[..., :rotary], x[..., rotary:]
    half = rotary // 2
    turned = turned * cos + torch.cat((-turned[..., half:], turned[..., :half]), dim=-1) * sin
    return torch.cat((turned, kept), dim=-1) if kept.shape[-1] else turned


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
