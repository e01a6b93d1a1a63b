"""Rotation of a LLaMA model: an orthogonal change of basis that leaves the FP function unchanged.

QuaRot (Ashkboos et al. 2024, spcl/QuaRot ``fake_quant/rotation_utils.py``) and learned-rotation
methods such as SpinQuant build on the same steps, each exact in FP:

1. **Norm folding** (``fold_norm``): an RMSNorm's weight g moves into the columns of the linears it
   feeds (W diag(g)) and the norm keeps weight 1. A norm without a per-channel weight then commutes
   with any orthogonal Q: RMSNorm(h Q) = RMSNorm(h) Q.
2. **Residual rotation** by an orthogonal Q (``rotate_ends``, ``rotate_block``): every writer of
   the residual stream (the embedding, o_proj, down_proj) writes h Q instead of h, every reader
   (q/k/v, gate/up, lm_head) reads through W Q, so their products are unchanged. A head tied to the
   embedding is untied first (``untie_head``): the official code rotates the shared matrix twice.
3. **Hadamard rotations inside a block** (``harness.quant.hadamard``), the second half of each
   kept as an *online* transform that runs on the activation before it is quantized
   (``QuantLinear.input_transform``):
   - v_proj's output per head (rows W_v <- (I kron H_d) W_v) and o_proj's input: o_proj's weight
     takes the full-width Hadamard (W_o <- W_o H_n^T) and its input, at run time,
     ``HeadsThenFull``: the per-head Hadamard undone, then the full-width one. For a power-of-two
     head count this is the official across-heads Hadamard (H_n = H_heads kron H_d); it needs no
     Hadamard of the head count's order, so 9 heads (smollm2) work too.
   - down_proj's input: W_d <- W_d H_m^T and ``FullHadamard`` on its input at run time.

Everything is computed in float64 and cast back, as the official code does.

The official ``fuse_layer_norms`` also subtracts each embedding row's mean (a LayerNorm step for
OPT that RMSNorm does not cancel: a small FP change on LLaMA); ``rotate_ends(embed_mean=True)``
reproduces it for fidelity checks.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.adapter import LlamaAdapter
from harness.errors import ConfigError
from harness.quant.hadamard import hadamard_transform


def _set(linear: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(linear, name)
    getattr(linear, name).data = value.to(dtype=old.dtype, device=old.device)


@torch.no_grad()
def untie_head(model: nn.Module, adapter: LlamaAdapter) -> bool:
    """Give ``lm_head`` its own copy of a weight it shares with the embedding; True if it was tied."""
    embed, head = adapter.embed(model), adapter.lm_head(model)
    if head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    return True


@torch.no_grad()
def fold_norm(norm: nn.Module, linears: list[nn.Module]) -> None:
    """W <- W diag(g) for each linear fed by ``norm``; the norm's weight becomes 1 (exact: RMSNorm has no bias)."""
    g = norm.weight.detach().double()
    for linear in linears:
        _set(linear, "weight", linear.weight.double() * g)
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def rotate_inputs(linears: list[nn.Module], q: torch.Tensor) -> None:
    """Readers of the rotated stream: W <- W Q."""
    for linear in linears:
        _set(linear, "weight", linear.weight.double() @ q.to(linear.weight.device))


@torch.no_grad()
def rotate_outputs(linears: list[nn.Module], q: torch.Tensor) -> None:
    """Writers of the rotated stream: W <- Q^T W, b <- Q^T b."""
    for linear in linears:
        qt = q.to(linear.weight.device).T
        _set(linear, "weight", qt @ linear.weight.double())
        if linear.bias is not None:
            _set(linear, "bias", qt @ linear.bias.double())


def per_head_hadamard(x: torch.Tensor, head_dim: int, transpose: bool = False) -> torch.Tensor:
    """The Hadamard of order ``head_dim`` on each head of the last dimension (heads x head_dim); ``transpose``: its inverse."""
    return hadamard_transform(x.reshape(*x.shape[:-1], -1, head_dim), transpose).reshape(x.shape)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Online transforms run in float32 for half-precision activations (the official ``fp32_had``), else as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class FullHadamard(nn.Module):
    """Online: x -> x H_n^T over the last dimension (down_proj's input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(_at_least_fp32(x)).to(x.dtype)

    def to_dict(self) -> dict:
        return {"kind": "hadamard"}


class HeadsThenFull(nn.Module):
    """Online: o_proj's input, whose heads v_proj rotated by H_d, to x H_n^T (the per-head Hadamard undone first)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(per_head_hadamard(_at_least_fp32(x), self.head_dim, transpose=True)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"

    def to_dict(self) -> dict:
        return {"kind": "heads_then_hadamard", "head_dim": self.head_dim}


def online_transform(data: dict) -> nn.Module:
    """The online transform a ``to_dict()`` describes (an exported model's manifest)."""
    if data.get("kind") == "hadamard":
        return FullHadamard()
    if data.get("kind") == "heads_then_hadamard":
        return HeadsThenFull(int(data["head_dim"]))
    raise ValueError(f"input_transform: unknown kind {data.get('kind')!r}; known: hadamard, heads_then_hadamard")


@torch.no_grad()
def check_foldable(model: nn.Module, adapter: LlamaAdapter) -> None:
    """Refuse, in one line naming it, a norm whose weight cannot be folded exactly into the linears after it.

    Folding needs y = x / rms(x) * g: an RMSNorm with a weight and no bias (a LayerNorm subtracts the mean,
    a bias would have to become one in every reader). Reads only module classes and attributes, so it runs
    on a lazily loaded model before any work.
    """
    norms = {"final norm": adapter.final_norm(model)}
    for i, layer in enumerate(adapter.layers(model)):
        for pair in (adapter.attn_in, adapter.mlp_in):
            norms[f"layers.{i}.{pair.producer}"] = layer.get_submodule(pair.producer)
    for where, norm in norms.items():
        kind = type(norm).__name__
        if not kind.endswith("RMSNorm") or getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is not None:
            raise ConfigError(f"model: {where} ({kind}) cannot be folded into the linears it feeds; rotation needs an "
                              "RMSNorm with a weight and no bias")


def rotate_ends(model: nn.Module, adapter: LlamaAdapter, q: torch.Tensor, embed_mean: bool = False) -> None:
    """The embedding writes h Q; the final norm folds into ``lm_head``, which reads through W Q (untied first)."""
    untie_head(model, adapter)
    embed = adapter.embed(model)
    e = embed.weight.double()
    if embed_mean:  # the official fuse_layer_norms step (not exact for RMSNorm)
        e = e - e.mean(dim=-1, keepdim=True)
    _set(embed, "weight", e @ q.to(e.device))
    fold_norm(adapter.final_norm(model), [adapter.lm_head(model)])
    rotate_inputs([adapter.lm_head(model)], q)


@torch.no_grad()
def rotate_block(layer: nn.Module, adapter: LlamaAdapter, q: torch.Tensor, head_dim: int) -> dict[str, nn.Module]:
    """Fold the block's norms, rotate its residual readers and writers by ``q`` and its Hadamard pairs.

    Returns the online transforms the block now needs, by linear name (to set as the ``QuantLinear``'s
    ``input_transform``): without them the block is not the same function.
    """
    get = layer.get_submodule
    readers = {pair.producer: [get(n) for n in pair.consumers] for pair in (adapter.attn_in, adapter.mlp_in)}
    for norm, linears in readers.items():
        fold_norm(get(norm), linears)
        rotate_inputs(linears, q)
    (o_name,), (down_name,) = adapter.attn_out.consumers, adapter.mlp_out.consumers
    o_proj, down_proj, v_proj = get(o_name), get(down_name), get(adapter.attn_out.producer)
    rotate_outputs([o_proj, down_proj], q)
    # v_proj's output per head: rows (heads x head_dim, in) -> per-head Hadamard of each column
    _set(v_proj, "weight", per_head_hadamard(v_proj.weight.double().T, head_dim).T)
    if v_proj.bias is not None:
        _set(v_proj, "bias", per_head_hadamard(v_proj.bias.double(), head_dim))
    for linear in (o_proj, down_proj):  # W <- W H^T (the online transform applies H to the input)
        _set(linear, "weight", hadamard_transform(linear.weight.double()))
    return {o_name: HeadsThenFull(head_dim), down_name: FullHadamard()}
