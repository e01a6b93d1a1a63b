"""Rotation of a model: an orthogonal change of basis that leaves the FP function unchanged.

QuaRot (Ashkboos et al. 2024, spcl/QuaRot ``fake_quant/rotation_utils.py``) and learned-rotation
methods such as SpinQuant build on the same steps, each exact in FP, each an operation of the model's
adapter (``harness.adapter``) so that every family it describes is rotated the same way:

1. **Norm folding** (``adapter.fold_norm``): an RMSNorm's per-channel factor g (Gemma's 1 + w) moves
   into the columns of the linears it feeds (W diag(g)) and the norm keeps factor 1. A norm without a
   per-channel factor then commutes with any orthogonal Q: RMSNorm(h Q) = RMSNorm(h) Q.
2. **Residual rotation** by an orthogonal Q (``rotate_ends``, ``rotate_block``): every writer of
   the residual stream (the embedding, o_proj, down_proj) writes h Q instead of h, every reader
   (q/k/v, gate/up, lm_head) reads through W Q, so their products are unchanged. A head tied to the
   embedding is untied first (``untie_head``): the official code rotates the shared matrix twice.
   A family whose sublayer outputs pass a norm before the residual add (Gemma3's post-norms:
   ``adapter.refusal("rotate_residual")``) cannot have its writers write h Q; there the residual stream
   keeps its basis and each reader rotates its input online instead (``ResidualRotation``, x -> x Q, with
   W <- W Q): the readers' activations and weights are those of the offline rotation, so the quantized
   model is the same function, for one online transform per reader.
3. **Hadamard rotations inside a block** (``harness.quant.hadamard``), the second half of each
   kept as an *online* transform that runs on the activation before it is quantized
   (``QuantLinear.input_transform``):
   - v_proj's output per head (rows W_v <- (I kron H_d) W_v) and o_proj's input: o_proj's weight
     takes the full-width Hadamard (W_o <- W_o H_n^T) and its input, at run time,
     ``HeadsThenFull``: the per-head Hadamard undone, then the full-width one. For a power-of-two
     head count this is the official across-heads Hadamard (H_n = H_heads kron H_d); it needs no
     Hadamard of the head count's order, so 9 heads (smollm2) work too.
   - down_proj's input: W_d <- W_d H_m^T and ``FullHadamard`` on its input at run time.

Everything is computed in float64 (norm folding: in the weights' precision, at least float32, where a
product of two weights is exact) and cast back, as the official code does.

The official ``fuse_layer_norms`` also subtracts each embedding row's mean (a LayerNorm step for
OPT that RMSNorm does not cancel: a small FP change on LLaMA); ``rotate_ends(embed_mean=True)``
reproduces it for fidelity checks.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from harness.adapter import LlamaAdapter
from harness.errors import ConfigError
from harness.quant.hadamard import hadamard_matrix, hadamard_transform, random_hadamard


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


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """The official ``random_orthogonal_matrix``: Q of the QR of a Gaussian matrix, columns signed by diag(R)."""
    g = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diag(r)).unsqueeze(0)


def residual_rotation(rotation: str, n: int, seed: int) -> torch.Tensor:
    """QuaRot's residual rotation Q (float64): ``hadamard`` (a Hadamard matrix with random signs) or ``random``."""
    if rotation == "hadamard":
        return random_hadamard(n, seed)
    if rotation == "random":
        return random_orthogonal(n, seed)
    raise ValueError(f"rotation: {rotation!r} is not known; use hadamard or random")


def per_head_hadamard(x: torch.Tensor, head_dim: int, transpose: bool = False) -> torch.Tensor:
    """The Hadamard of order ``head_dim`` on each head of the last dimension (heads x head_dim); ``transpose``: its inverse."""
    return hadamard_transform(x.reshape(*x.shape[:-1], -1, head_dim), transpose).reshape(x.shape)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Online transforms run in float32 for half-precision activations (the official ``fp32_had``), else as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@functools.lru_cache(maxsize=8)
def _rotation_operand(rotation: str, n: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # hadamard: Q = diag(s) H^T, so x Q = hadamard_transform(x * s) and the signs s = diag(Q H) are all it needs
    q = residual_rotation(rotation, n, seed)
    operand = (q @ hadamard_matrix(n)).diagonal().sign() if rotation == "hadamard" else q
    return operand.to(device, dtype)


class ResidualRotation(nn.Module):
    """Online: x -> x Q, the residual rotation at a reader's input where the residual stream keeps its basis
    (module docstring, step 2). Holds only its recipe (kind, width, seed): Q is rebuilt, once per device and
    dtype, so a block's copies cost nothing and an exported model names it in one line."""

    def __init__(self, rotation: str, size: int, seed: int) -> None:
        super().__init__()
        self.rotation, self.size, self.seed = rotation, size, seed

    def matrix(self) -> torch.Tensor:
        """Q, float64 on CPU."""
        return residual_rotation(self.rotation, self.size, self.seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _at_least_fp32(x)
        operand = _rotation_operand(self.rotation, self.size, self.seed, y.device, y.dtype)
        y = hadamard_transform(y * operand) if self.rotation == "hadamard" else y @ operand
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"rotation={self.rotation}, size={self.size}, seed={self.seed}"

    def to_dict(self) -> dict:
        return {"kind": "residual_rotation", "rotation": self.rotation, "size": self.size, "seed": self.seed}


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
    if data.get("kind") == "residual_rotation":
        return ResidualRotation(str(data["rotation"]), int(data["size"]), int(data["seed"]))
    raise ValueError(f"input_transform: unknown kind {data.get('kind')!r}; known: hadamard, heads_then_hadamard, "
                     "residual_rotation")


def residual_online(adapter: LlamaAdapter) -> bool:
    """Whether the family's residual rotation runs online at each reader (step 2 of the module docstring)."""
    return adapter.refusal("rotate_residual") is not None


def check_foldable(model: nn.Module, adapter: LlamaAdapter) -> None:
    """Refuse, in one line naming it, a norm whose per-channel factor cannot be folded exactly into the linears after it.

    Folding needs y = x / rms(x) * g (``adapter.norm_foldable``: an RMSNorm with a weight and no bias; a LayerNorm
    subtracts the mean, a bias would have to become one in every reader). Reads only module classes and attributes,
    so it runs on a lazily loaded model before any work.
    """
    norms = {} if residual_online(adapter) else {"final norm": adapter.final_norm(model)}
    for i, layer in enumerate(adapter.layers(model)):
        for pair in (adapter.attn_in, adapter.mlp_in):
            norms[f"layers.{i}.{pair.producer}"] = layer.get_submodule(pair.producer)
    for where, norm in norms.items():
        if not adapter.norm_foldable(norm):
            raise ConfigError(f"model: {where} ({type(norm).__name__}) cannot be folded into the linears it feeds; rotation "
                              "needs an RMSNorm with a weight and no bias")


@torch.no_grad()
def rotate_ends(model: nn.Module, adapter: LlamaAdapter, q: torch.Tensor, embed_mean: bool = False) -> None:
    """The embedding writes h Q; the final norm folds into ``lm_head``, which reads through W Q (untied first).

    Where the residual rotation runs online (``residual_online``) the stream keeps its basis: only ``embed_mean``
    changes the embedding, and the head stays as it is.
    """
    embed = adapter.embed(model)
    online = residual_online(adapter)
    if online and not embed_mean:
        return
    untie_head(model, adapter)
    e = embed.weight.double()
    if embed_mean:  # the official fuse_layer_norms step (not exact for RMSNorm)
        e = e - e.mean(dim=-1, keepdim=True)
    _set(embed, "weight", e if online else e @ q.to(e.device))
    if not online:
        adapter.fold_final_norm(model)
        adapter.rotate_input(adapter.lm_head(model), q)


@torch.no_grad()
def rotate_block(layer: nn.Module, adapter: LlamaAdapter, q: torch.Tensor, head_dim: int,
                 online: ResidualRotation | None = None) -> dict[str, nn.Module]:
    """Fold the block's norms, rotate its residual readers and writers by ``q`` and its Hadamard pairs.

    Returns the online transforms the block now needs, by linear name (to set as the ``QuantLinear``'s
    ``input_transform``): without them the block is not the same function. With ``online`` (the residual
    rotation of a family that keeps it online, whose Q is ``q``) the writers keep their outputs and every
    reader gets ``online`` as its input transform.
    """
    get = layer.get_submodule
    transforms: dict[str, nn.Module] = {}
    for pair in (adapter.attn_in, adapter.mlp_in):
        adapter.fold_norm(layer, pair)
        for name in pair.consumers:
            adapter.rotate_input(get(name), q)
            if online is not None:
                transforms[name] = online
    (o_name,), (down_name,) = adapter.attn_out.consumers, adapter.mlp_out.consumers
    o_proj, down_proj, v_proj = get(o_name), get(down_name), get(adapter.attn_out.producer)
    if online is None:
        for writer in (o_proj, down_proj):
            adapter.rotate_output(writer, q)
    # v_proj's output per head: rows (heads x head_dim, in) -> per-head Hadamard of each column
    _set(v_proj, "weight", per_head_hadamard(v_proj.weight.double().T, head_dim).T)
    if v_proj.bias is not None:
        _set(v_proj, "bias", per_head_hadamard(v_proj.bias.double(), head_dim))
    for linear in (o_proj, down_proj):  # W <- W H^T (the online transform applies H to the input)
        _set(linear, "weight", hadamard_transform(linear.weight.double()))
    return {**transforms, o_name: HeadsThenFull(head_dim), down_name: FullHadamard()}
