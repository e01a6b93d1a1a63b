"""One decoder block under FlatQuant: its transforms and clipping while it trains, then merged into its weights.

While training (:func:`attach`), every linear of the block is a :class:`FlatLinear`: its input goes through the
group's transform and the learned-clip activation quantizer, its weight through the inverse half, the learned
weight clip (LWC), v_proj's per-head output transform, and round-to-nearest, so the loss sees what the quantized
block will compute. The groups, as the official ``FlatQuantLlamaAttention`` / ``FlatQuantLlamaMLP``:

- q/k/v's input (``attn_in``) and gate/up's (``mlp_in``): P1 ⊗ P2 with a per-channel scale d;
- down_proj's input (``mlp_out``): P1 ⊗ P2 with d;
- o_proj's input: Po ⊗ Pv, Po of the head count mixing heads, Pv of the head dimension folded into v_proj's
  output rows (the V cache is quantized in its basis);
- with K (or Q) quantized: Pk of the head dimension on Q (Pk^-T) and K (Pk) after RoPE, so Q Kᵀ is unchanged.

:func:`merge` then does what the official ``reparameterize`` does: each d folds into the norm before it
(``adapter.fold_scale``: Gemma's 1 + w too) or, for down_proj, into up_proj's rows; the inverse halves, the
weight clip and Pv fold into the weights (``adapter.transform_input`` / ``transform_output``, float64); the
online halves stay as ``KroneckerAffine`` transforms on the linears' inputs and on Q and K, the learned
activation clips on their quantizers. The block is then the FP function it was, with its linears carriers
of online transforms for any weight solver (``harness.engine.solvers.solve_block``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness import ActQuantizer, BitSpec, LlamaAdapter, quantize_weight
from harness.engine.calibration_stats import SCALE_CLAMP_MIN, smoothing_scales
from harness.quant import attention
from harness.quant.qlinear import set_act_clip, with_input_transform
from methods.flatquant.transforms import (
    LWC_INIT,
    ClippedActQuantizer,
    InvertibleMatrix,
    KroneckerAffine,
    KroneckerTransform,
    clip_rows,
    kron_apply,
)


@dataclass(frozen=True)
class BlockOptions:
    """What :func:`attach` needs of the method's options."""

    form: str = "svd"
    diag: bool = True
    diag_alpha: float | None = 0.3  # None: d starts at 1 (official one_style)
    lwc: bool = True
    lac: bool = True


class FlatLinear(nn.Module):
    """A linear while FlatQuant trains: y = Q_a(online(x)) Q_w(out(clip(weight_in(W))))ᵀ + out(b)."""

    def __init__(self, linear: nn.Linear, spec: BitSpec, act_quant: nn.Module, online, weight_in, weight_out=None,
                 lwc: bool = True) -> None:
        super().__init__()
        self.linear, self.spec, self.act_quant = linear, spec, act_quant
        self._fns = (online, weight_in, weight_out)  # a tuple: the transforms' parameters belong to FlatBlock
        self.gamma = nn.Parameter(torch.full((linear.out_features, 1), LWC_INIT)) if lwc else None
        self.beta = nn.Parameter(torch.full((linear.out_features, 1), LWC_INIT)) if lwc else None

    def weight(self) -> torch.Tensor:
        _, weight_in, weight_out = self._fns
        w = weight_in(self.linear.weight)
        if self.gamma is not None:
            w = clip_rows(w, self.gamma, self.beta)
        if weight_out is not None:
            w = weight_out(w.T).T
        return quantize_weight(w, self.spec, zero_point_grad=False)  # the official find_params: a plain round

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        online, _, weight_out = self._fns
        bias = self.linear.bias
        if bias is not None and weight_out is not None:
            bias = weight_out(bias)
        return F.linear(self.act_quant(online(x)), self.weight(), bias)


class _Times(nn.Module):
    """x -> x M of a learnable matrix (``inverse_t``: x M^-T) over heads' last dimension: Q and K after RoPE."""

    def __init__(self, matrix: InvertibleMatrix, inverse_t: bool) -> None:
        super().__init__()
        self._matrix, self.inverse_t = [matrix], inverse_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._matrix[0]
        return x @ (m.inverse_t() if self.inverse_t else m.matrix()).to(x.dtype)


class FlatBlock(nn.Module):
    """The learnable transforms of one decoder block, with the quantizers and clips attached to it."""

    def __init__(self, layer: nn.Module, adapter: LlamaAdapter, spec: BitSpec, options: BlockOptions,
                 geometry: tuple[int, int, int], act_max: dict[str, torch.Tensor] | None, seed: int) -> None:
        super().__init__()
        heads, _, head_dim = geometry
        self.adapter, self.spec, self.options, self.head_dim = adapter, spec, options, head_dim
        get = layer.get_submodule
        a = adapter
        device = get(a.qkv_names[0]).weight.device

        def diag(pair) -> torch.Tensor | None:
            if not options.diag:
                return None
            recorded = None if act_max is None or options.diag_alpha is None else act_max.get(pair.consumers[0])
            if recorded is None:  # one_style, or an expert no calibration token reached
                return torch.ones(get(pair.consumers[0]).in_features)
            # official sq_style: d = max|W|^(1-alpha) / max|X|^alpha, the inverse of SmoothQuant's scale (x is multiplied);
            # max|W| over the linears the transform feeds (a router reads the input FP and takes only d)
            weights = [get(c).weight for c in pair.consumers if c not in a.routers]
            return 1.0 / smoothing_scales(recorded.clamp(min=SCALE_CLAMP_MIN), weights, options.diag_alpha)

        form = options.form
        self.attn_in = KroneckerTransform(get(a.qkv_names[0]).in_features, form, seed, diag(a.attn_in))
        self.mlp_in = KroneckerTransform(get(a.mlp_in.consumers[0]).in_features, form, seed + 4, diag(a.mlp_in))
        self.heads = InvertibleMatrix(heads, form, seed + 8)
        self.value = InvertibleMatrix(head_dim, form, seed + 10)
        # one down_proj transform per MLP: the block's, or each routed expert's (adapter.mlp_outs)
        self.mlp_outs = nn.ModuleList(KroneckerTransform(get(pair.consumers[0]).in_features, form, seed + 16 + 4 * i,
                                                         diag(pair)) for i, pair in enumerate(a.mlp_outs))
        self.key: InvertibleMatrix | None = None
        self._attention: list[attention.AttentionQuantizer] = []  # a list: the quantizer belongs to the layer
        if spec.attention_scope == "head" and (spec.quantizes_kv or spec.quantizes_attention):
            quantizer = attention.install(get(a.attention_path), spec)
            self._attention.append(quantizer)
            if quantizer.q.enabled or quantizer.k.enabled:  # official: kcache_trans with K or Q quantized
                self.key = InvertibleMatrix(head_dim, form, seed + 12)
        self.to(device)

    @property
    def attention_quantizer(self) -> attention.AttentionQuantizer | None:
        return self._attention[0] if self._attention else None

    # -- the pieces each linear reads ----------------------------------------------------------------------

    def o_online(self, x: torch.Tensor) -> torch.Tensor:
        return kron_apply(x, self.heads.matrix(), None)

    def o_weight(self, w: torch.Tensor) -> torch.Tensor:
        return kron_apply(w, self.heads.inverse_t(), self.value.inverse_t())

    def v_out(self, rows: torch.Tensor) -> torch.Tensor:
        return kron_apply(rows, None, self.value.matrix())

    def act_quantizer(self) -> nn.Module:
        s = self.spec
        if self.options.lac and s.quantizes_activations:
            return ClippedActQuantizer(s.a_bits, s.a_symmetric, s.full_grid)
        return ActQuantizer(s.a_bits, s.a_symmetric, s.a_clip, s.full_grid)

    def attach(self, layer: nn.Module) -> None:
        """Swap the block's linears for :class:`FlatLinear` and put the K transform and learned clips on its attention."""
        a = self.adapter
        (o_name,) = a.attn_out.consumers
        plan = {name: (self.attn_in, self.attn_in.weight_side, None) for name in a.qkv_names}
        plan[a.qkv_names[2]] = (self.attn_in, self.attn_in.weight_side, self.v_out)
        plan[o_name] = (self.o_online, self.o_weight, None)
        plan.update({name: (self.mlp_in, self.mlp_in.weight_side, None) for name in a.mlp_in.consumers})
        for pair, transform in zip(a.mlp_outs, self.mlp_outs):
            plan[pair.consumers[0]] = (transform, transform.weight_side, None)
        for p in layer.parameters():
            p.requires_grad_(False)
        for name in a.linear_names:
            online, weight_in, weight_out = plan[name]
            linear = layer.get_submodule(name)
            flat = FlatLinear(linear, self.spec, self.act_quantizer(), online, weight_in, weight_out,
                              self.options.lwc and self.spec.quantizes_weights)  # LWC clips what is rounded
            _replace(layer, name, flat.to(linear.weight.device))
        if self.attention_quantizer is not None:
            q = self.attention_quantizer
            if self.options.lac:
                device = layer.get_submodule(a.attn_out.consumers[0]).linear.weight.device
                q.q, q.k, q.v = (ClippedActQuantizer(x.bits, x.symmetric, x.full_grid).to(device) if x.enabled else x
                                 for x in (q.q, q.k, q.v))
            if self.key is not None:
                attention.set_qk_transforms(q, _Times(self.key, inverse_t=True), _Times(self.key, inverse_t=False))

    def parameter_groups(self, layer: nn.Module, lr: float, clip_lr: float, train_transforms: bool) -> list[dict]:
        """AdamW groups: the transforms and scales at ``lr``, the clipping factors at ``clip_lr`` (official 10 x lr)."""
        kronecker = [self.attn_in, self.mlp_in, *self.mlp_outs]
        matrices = [m for m in (*kronecker, self.heads, self.value, self.key) if m is not None]
        transforms = [p for m in matrices for n, p in m.named_parameters() if not n.endswith("diag")]
        scales = [t.diag for t in kronecker if t.diag is not None]
        # the linears' LWC and LAC factors and the attention's LAC factors: all inside the layer
        clips = [p for m in layer.modules() if isinstance(m, (FlatLinear, ClippedActQuantizer)) for p in (m.gamma, m.beta)
                 if p is not None]
        for p in transforms:
            p.requires_grad_(train_transforms)
        groups = [{"params": (transforms if train_transforms else []) + scales, "lr": lr}, {"params": clips, "lr": clip_lr}]
        return [g for g in groups if g["params"]]

    # -- after training ------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, layer: nn.Module) -> None:
        """Fold the scales, inverse halves, weight clips and Pv into the weights; leave the online halves and the
        learned activation clips on carriers (module docstring). The block is then the FP function it was."""
        a, get = self.adapter, layer.get_submodule
        for transform in (self.attn_in, self.mlp_in, *self.mlp_outs):
            transform.forget()
        flats: dict[str, FlatLinear] = {name: get(name) for name in a.linear_names}
        for name, flat in flats.items():
            _replace(layer, name, flat.linear)
        (o_name,) = a.attn_out.consumers

        def clip(name: str) -> None:
            flat, linear = flats[name], get(name)
            if flat.gamma is not None:
                linear.weight.data = clip_rows(linear.weight.double(), flat.gamma.double(), flat.beta.double()).to(
                    linear.weight.dtype)

        def transformed(pair, transform: KroneckerTransform) -> None:
            if transform.diag is not None:
                a.fold_scale(layer, pair, 1.0 / transform.diag.double())
            left, right = (f.double() for f in transform.factors(inverse_t=True))
            for name in pair.consumers:
                if name not in a.routers:  # a router reads the input FP: it takes d (above) and no P
                    a.transform_input(get(name), lambda w: kron_apply(w, left, right))
                    clip(name)

        pv = self.value.matrix().double()
        transformed(a.attn_in, self.attn_in)
        a.transform_output(get(a.qkv_names[2]), lambda rows: kron_apply(rows, None, pv))
        po_t, pv_t = self.heads.inverse_t().double(), self.value.inverse_t().double()
        a.transform_input(get(o_name), lambda w: kron_apply(w, po_t, pv_t))
        clip(o_name)
        transformed(a.mlp_in, self.mlp_in)  # up_proj clipped before down_proj's scale moves into its rows (official order)
        for pair, transform in zip(a.mlp_outs, self.mlp_outs):
            transformed(pair, transform)

        online = {name: KroneckerAffine(*self.attn_in.factors()) for name in a.qkv_names}
        online[o_name] = KroneckerAffine(self.heads.matrix(), None)
        online.update({name: KroneckerAffine(*self.mlp_in.factors()) for name in a.mlp_in.consumers})
        online.update({pair.consumers[0]: KroneckerAffine(*t.factors()) for pair, t in zip(a.mlp_outs, self.mlp_outs)})
        for name in a.linear_names:
            carrier = with_input_transform(layer, name, online[name])
            if isinstance(flats[name].act_quant, ClippedActQuantizer):
                set_act_clip(carrier, *flats[name].act_quant.ratios())
        if self.attention_quantizer is not None:
            q = self.attention_quantizer
            if self.key is not None:
                pk = self.key.matrix().detach()
                attention.set_qk_transforms(q, KroneckerAffine(None, self.key.inverse_t().detach()), KroneckerAffine(None, pk))
            for which in ("q", "k", "v"):
                quantizer = getattr(q, which)
                if isinstance(quantizer, ClippedActQuantizer):
                    attention.set_clip(q, which, *quantizer.ratios())


def _replace(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, attr, module)
