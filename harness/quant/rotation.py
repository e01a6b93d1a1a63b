"""Rotation of a model: an orthogonal change of basis that leaves the FP function unchanged.

QuaRot (Ashkboos et al. 2024, spcl/QuaRot ``fake_quant/rotation_utils.py``) and learned-rotation
methods such as SpinQuant build on the same steps, each exact in FP, each an operation of the model's
adapter (``harness.adapter``) so that every family it describes is rotated the same way:

1. **Norm folding** (``adapter.fold_norm``): an RMSNorm's per-channel factor g (Gemma's 1 + w) moves
   into the columns of the linears it feeds (W diag(g)) and the norm keeps factor 1. A norm without a
   per-channel factor then commutes with any orthogonal Q: RMSNorm(h Q) = RMSNorm(h) Q.
2. **Residual rotation** by an orthogonal Q (``rotate_ends``, ``rotate_block``): every writer of
   the residual stream (the embedding, o_proj, down_proj: every expert's in a MoE) writes h Q instead of h,
   every reader (q/k/v, gate/up, a MoE's router, lm_head) reads through W Q, so their products are unchanged
   (a router's logits too, so it routes as before). A head tied to the
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
   A width without a Hadamard matrix (Qwen2.5-0.5B's MLP 4864 = 19 x 256, a head dimension, the residual
   width) takes R_K ⊗ H_m of the run's seed instead (``harness.quant.hadamard.rotation_transform``; online
   before down_proj: ``KroneckerRotation``), orthogonal like the Hadamard, so every step stays exact.

The online transforms are ``harness.quant.online.OnlineTransform`` kinds (``hadamard``, ``heads_then_hadamard``,
``kronecker``, ``residual_rotation``): each holds its recipe, which an export writes and a reload rebuilds.

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
from harness.quant.hadamard import (
    hadamard_transform,
    has_hadamard,
    kronecker_matrix,
    kronecker_transform,
    random_hadamard,
    random_orthogonal,
    random_signs,
    rotation_name,
    rotation_transform,
)
from harness.quant.online import OnlineTransform, register_online_transform


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


def residual_rotation(rotation: str, n: int, seed: int) -> torch.Tensor:
    """QuaRot's residual rotation Q (float64): ``hadamard`` (a Hadamard matrix with random signs; R_K ⊗ H_m with
    random signs where the width has none) or ``random``."""
    if rotation == "hadamard":
        return random_hadamard(n, seed)
    if rotation == "random":
        return random_orthogonal(n, seed)
    raise ValueError(f"rotation: {rotation!r} is not known; use hadamard or random")


def per_head_hadamard(x: torch.Tensor, head_dim: int, transpose: bool = False, seed: int = 0) -> torch.Tensor:
    """The rotation of order ``head_dim`` (``rotation_transform``: its Hadamard, or R_K ⊗ H_m of ``seed``) on each head
    of the last dimension (heads x head_dim); ``transpose``: its inverse."""
    return rotation_transform(x.reshape(*x.shape[:-1], -1, head_dim), seed, transpose).reshape(x.shape)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Online transforms run in float32 for half-precision activations (the official ``fp32_had``), else as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@functools.lru_cache(maxsize=8)
def _rotation_operand(rotation: str, n: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # hadamard: Q = diag(s) M (M = rotation_matrix(n, seed)), so x Q = rotation_transform(x * s): the signs are all it needs
    operand = random_signs(n, seed) if rotation == "hadamard" else residual_rotation(rotation, n, seed)
    return operand.to(device, dtype)


@register_online_transform
class ResidualRotation(OnlineTransform):
    """Online: x -> x Q, the residual rotation at a reader's input where the residual stream keeps its basis
    (module docstring, step 2). Holds only its recipe (kind, width, seed): Q is rebuilt, once per device and
    dtype, so a block's copies cost nothing and an exported model names it in one line."""

    kind = "residual_rotation"

    def __init__(self, rotation: str, size: int, seed: int) -> None:
        super().__init__()
        self.rotation, self.size, self.seed = str(rotation), int(size), int(seed)

    def matrix(self) -> torch.Tensor:
        """Q, float64 on CPU."""
        return residual_rotation(self.rotation, self.size, self.seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _at_least_fp32(x)
        operand = _rotation_operand(self.rotation, self.size, self.seed, y.device, y.dtype)
        y = rotation_transform(y * operand, self.seed) if self.rotation == "hadamard" else y @ operand
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"rotation={self.rotation}, size={self.size}, seed={self.seed}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "rotation": self.rotation, "size": self.size, "seed": self.seed}


@register_online_transform
class FullHadamard(OnlineTransform):
    """Online: x -> x H_n^T over the last dimension (down_proj's input)."""

    kind = "hadamard"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(_at_least_fp32(x)).to(x.dtype)

    def to_dict(self) -> dict:
        return {"kind": self.kind}


@register_online_transform
class KroneckerRotation(OnlineTransform):
    """Online: x -> x (R_K ⊗ H_m) over the last dimension of width ``size`` = K x m, for a width without a Hadamard
    matrix (``harness.quant.hadamard.kronecker_transform``: the butterfly along m, one K x K matmul along K)."""

    kind = "kronecker"

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        self.size, self.seed = int(size), int(seed)

    def matrix(self) -> torch.Tensor:
        """R_K ⊗ H_m, float64 on CPU."""
        return kronecker_matrix(self.size, self.seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"KroneckerRotation of width {self.size} applied to inputs of width {x.shape[-1]}")
        return kronecker_transform(_at_least_fp32(x), self.seed).to(x.dtype)

    def extra_repr(self) -> str:
        return rotation_name(self.size, self.seed)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "size": self.size, "seed": self.seed}


def full_rotation(n: int, seed: int) -> OnlineTransform:
    """The online x -> x M of ``rotation_matrix(n, seed)``: ``FullHadamard`` where width n has a Hadamard matrix, else
    ``KroneckerRotation``."""
    return FullHadamard() if has_hadamard(n) else KroneckerRotation(n, seed)


@register_online_transform
class HeadsThenFull(OnlineTransform):
    """Online: o_proj's input, whose heads v_proj rotated by H_d, to x H_n^T (the per-head Hadamard undone first).

    With ``seed`` (set where the head dimension or the width has no Hadamard matrix) each of the two is
    ``rotation_transform``'s: R_K ⊗ H_m of that seed where the table has no Hadamard."""

    kind = "heads_then_hadamard"
    seed: int | None = None  # a class default, so a block pickled without it still runs

    def __init__(self, head_dim: int, seed: int | None = None) -> None:
        super().__init__()
        self.head_dim, self.seed = int(head_dim), None if seed is None else int(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = self.seed or 0
        y = per_head_hadamard(_at_least_fp32(x), self.head_dim, transpose=True, seed=seed)
        return rotation_transform(y, seed).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}" + ("" if self.seed is None else f", seed={self.seed}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "head_dim": self.head_dim, **({} if self.seed is None else {"seed": self.seed})}


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
                 online: ResidualRotation | None = None, seed: int = 0) -> dict[str, OnlineTransform]:
    """Fold the block's norms, rotate its residual readers and writers by ``q`` and its Hadamard pairs.

    Returns the online transforms the block now needs, by linear name (to set as the ``QuantLinear``'s
    ``input_transform``): without them the block is not the same function. With ``online`` (the residual
    rotation of a family that keeps it online, whose Q is ``q``) the writers keep their outputs and every
    reader gets ``online`` as its input transform. A width without a Hadamard matrix (head dimension, o_proj's
    or down_proj's input) is rotated by R_K ⊗ H_m of ``seed`` instead (``rotation_transform``).
    """
    get = layer.get_submodule
    transforms: dict[str, OnlineTransform] = {}
    for pair in (adapter.attn_in, adapter.mlp_in):
        adapter.fold_norm(layer, pair)
        for name in pair.consumers:
            if online is not None and name in adapter.routers:
                continue  # a MoE router takes no online transform: it reads the stream, which keeps its basis, as it is
            adapter.rotate_input(get(name), q)
            if online is not None:
                transforms[name] = online
    (o_name,), down_names = adapter.attn_out.consumers, [pair.consumers[0] for pair in adapter.mlp_outs]  # one per expert
    o_proj, v_proj, downs = get(o_name), get(adapter.attn_out.producer), [get(name) for name in down_names]
    if online is None:
        for writer in (o_proj, *downs):
            adapter.rotate_output(writer, q)
    # v_proj's output per head: rows (heads x head_dim, in) -> per-head rotation of each column
    _set(v_proj, "weight", per_head_hadamard(v_proj.weight.double().T, head_dim, seed=seed).T)
    if v_proj.bias is not None:
        _set(v_proj, "bias", per_head_hadamard(v_proj.bias.double(), head_dim, seed=seed))
    for linear in (o_proj, *downs):  # W <- W M (the online transform applies M to the input: x M (W M)^T = x W^T)
        _set(linear, "weight", rotation_transform(linear.weight.double(), seed))
    heads_seed = None if has_hadamard(head_dim) and has_hadamard(o_proj.weight.shape[1]) else seed
    return {**transforms, o_name: HeadsThenFull(head_dim, heads_seed),
            **{name: full_rotation(down.weight.shape[1], seed) for name, down in zip(down_names, downs)}}
