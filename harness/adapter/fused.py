"""One ``nn.Linear`` per projection: the modules an adapter's ``prepare`` puts where a family fuses or stacks weights.

Methods quantize, scale and rotate separate linears at the names the adapter gives (q_proj, gate_proj, ...). Where a
family keeps several projections in one tensor, its adapter replaces that module by an equivalent one of separate
linears before any method runs (``LlamaAdapter.prepare``: on load, and in ``Method.apply`` for a model built elsewhere):

- :class:`FusedLinear`: one linear whose output is several projections side by side (Phi-3's ``qkv_proj``,
  ``gate_up_proj``) as child linears (``qkv_proj.q_proj``, ...) whose outputs it concatenates in the fused order;
- :class:`RoutedExperts`: a mixture-of-experts MLP whose experts are stacked 3D parameters (Qwen3-MoE) as a
  :class:`Router` (a linear, kept FP) and one :class:`GatedMLP` of three linears per expert. Each expert runs on the
  tokens routed to it, one sequence at a time, so a hook on an expert's linear sees only its routed tokens, one sample
  per sequence: calibration statistics (GPTQ Hessians, activation maxima, kept samples) are each expert's own.

Both compute what the module they replace computes (tests/harness/adapter/test_prepare.py). A prepared block's state
converts from the family's checkpoint layout (:func:`prepared_state`, for blocks loaded lazily from safetensors) and
back (:func:`checkpoint_state`, for a dense export that transformers loads).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """A linear holding a copy of ``weight`` (out, in) and ``bias`` (on their device, the meta device included)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
    return linear


class FusedLinear(nn.Module):
    """Several linears of one input whose outputs are concatenated, in the order of ``parts``: a fused projection."""

    def __init__(self, parts: dict[str, nn.Linear]) -> None:
        super().__init__()
        self.parts = tuple(parts)
        for name, linear in parts.items():
            self.add_module(name, linear)

    @classmethod
    def split(cls, linear: nn.Linear, sizes: dict[str, int]) -> FusedLinear:
        """``linear``'s output rows (and bias) cut into consecutive parts of ``sizes`` (name -> rows), in order."""
        if sum(sizes.values()) != linear.out_features:
            raise ValueError(f"parts {sizes} do not add up to the linear's {linear.out_features} outputs")
        rows = list(sizes.values())
        weights = linear.weight.split(rows)
        biases = linear.bias.split(rows) if linear.bias is not None else [None] * len(rows)
        grad = linear.weight.requires_grad
        return cls({name: _linear(w, b, grad) for name, w, b in zip(sizes, weights, biases)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.get_submodule(name)(x) for name in self.parts], dim=-1)


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)): one expert."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: Callable) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Linear):
    """A top-k router: logits x W^T (one row per expert), softmax in float32, the ``top_k`` largest probabilities
    (renormalised to sum to 1 when ``normalize``) in the logits' dtype, and their experts; per token, flattened.

    A linear of the MLP's input like the experts' gate/up, so every scale or rotation of that input moves into its
    columns too; never quantized (``LlamaAdapter.routers``), like the head."""

    def __init__(self, weight: torch.Tensor, top_k: int, normalize: bool) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.top_k, self.normalize = top_k, normalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = super().forward(x.reshape(-1, self.in_features))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return top.to(logits.dtype), experts

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, normalize={self.normalize}"


class RoutedExperts(nn.Module):
    """A mixture-of-experts MLP: each token's output is the sum of its top-k experts' outputs times their weights.

    ``gate`` (a :class:`Router`) reads the whole (batch, seqlen, hidden) input; expert e runs once per sequence on the
    (1, tokens, hidden) of that sequence routed to it (not at all where none is)."""

    def __init__(self, gate: Router, experts: list[GatedMLP]) -> None:
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(experts)

    @classmethod
    def from_stacked(cls, router_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn: Callable,
                     top_k: int, normalize: bool) -> RoutedExperts:
        """From transformers' stacked experts: ``gate_up`` (experts, 2 x inter, hidden), gate rows first; ``down``
        (experts, hidden, inter)."""
        grad = gate_up.requires_grad
        experts = []
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e].chunk(2, dim=0)
            experts.append(GatedMLP(_linear(gate, None, grad), _linear(up, None, grad), _linear(down[e], None, grad), act_fn))
        return cls(Router(router_weight, top_k, normalize), experts)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seqlen, width = hidden.shape
        weights, chosen = self.gate(hidden)
        weights, chosen = weights.view(batch, seqlen, -1), chosen.view(batch, seqlen, -1)
        rows = []
        for x, w, c in zip(hidden, weights, chosen):
            out = torch.zeros_like(x)
            for e in c.unique().tolist():
                token, slot = torch.where(c == e)
                y = self.experts[e](x[token].unsqueeze(0)).squeeze(0) * w[token, slot, None]
                out = out.index_add(0, token, y.to(out.dtype))
            rows.append(out)
        return torch.stack(rows)


# -- checkpoint layout <-> prepared layout ----------------------------------------------------------------------------

def prepared_state(root: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (names relative to ``root``, a prepared block or model) in the prepared layout: a fused linear's
    weight and bias cut into its parts, stacked experts into each expert's linears. Other names pass unchanged."""
    out = dict(tensors)
    for path, module in root.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, FusedLinear):
            rows = [module.get_submodule(p).out_features for p in module.parts]
            for kind in ("weight", "bias"):
                if f"{prefix}{kind}" in out:
                    for part, t in zip(module.parts, out.pop(f"{prefix}{kind}").split(rows)):
                        out[f"{prefix}{part}.{kind}"] = t
        elif isinstance(module, RoutedExperts) and f"{prefix}experts.gate_up_proj" in out:
            gate_up, down = out.pop(f"{prefix}experts.gate_up_proj"), out.pop(f"{prefix}experts.down_proj")
            for e in range(gate_up.shape[0]):
                gate, up = gate_up[e].chunk(2, dim=0)
                out.update({f"{prefix}experts.{e}.gate_proj.weight": gate, f"{prefix}experts.{e}.up_proj.weight": up,
                            f"{prefix}experts.{e}.down_proj.weight": down[e]})
    return out


def checkpoint_state(root: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prepared model's ``state`` in its family's checkpoint layout, which ``from_pretrained`` loads: each fused
    linear's parts concatenated back (per-expert linears are already the layout of MoE checkpoints)."""
    out = dict(state)
    for path, module in root.named_modules():
        if isinstance(module, FusedLinear):
            for kind in ("weight", "bias"):
                keys = [f"{path}.{part}.{kind}" for part in module.parts]
                if all(k in out for k in keys):
                    out[f"{path}.{kind}"] = torch.cat([out.pop(k) for k in keys])
    return out


PREPARED_MODULES = (FusedLinear, RoutedExperts)
