"""OmniQuant-style calibration: learnable weight clipping (LWC) + learnable equivalent transform (LET).

After OpenGVLab/OmniQuant (Shao et al., ICLR 2024), trained block by block on the shared engine
(``harness.engine.blockwise``): for every decoder block the quantized block, fed the inputs the quantized
model produced so far, is trained to reproduce the FP block's outputs on the FP inputs
(MSE, AdamW, weight decay 0, activation quantizers on while training, as the official W4A4 runs).

- LWC: every linear's weight range is clipped per output channel (per group with ``g...``):
  max' = sigmoid(gamma) * max, min' = sigmoid(beta) * min, gamma = beta = 4.0 at the start.
- LET (LLaMA, no shift): learnable per-channel scales s, dividing a producer's output and
  multiplying its consumers' input columns, for the adapter's pairs (LLaMA: input_layernorm -> q/k/v,
  post_attention_layernorm -> gate/up, v_proj -> o_proj); plus a q/k scale (q rows / s, k rows * s,
  biases with their rows). down_proj has none. The three pair scales start at the SmoothQuant scale
  max|X|^alpha / max|W|^(1-alpha) from the block's FP inputs; the q/k scale starts at 1. The scaled
  weights come from the adapter (``scaled_weight``, ``scaled_norm_weight``: a Gemma3 norm's factor
  1 + w is what is divided). Families with a norm on each head of Q and K (Qwen3, Gemma3) have no q/k
  scale: such a norm undoes any per-channel scale of q_proj's and k_proj's outputs.
- Afterwards the scales are folded into the norm weights and linear weights and the clipping into
  the fake-quantized weights: the result is the model's own class with frozen ``QuantLinear``s.

Grouped-query attention: the official code has no GQA branch at all (OpenGVLab/OmniQuant 95fae1bd:
quantize/omniquant.py L224 sizes the q/k scale by q_proj's outputs and applies it to k_proj's rows,
models/transformation.py L50-51 / L66-69; under GQA those shapes do not match), and no official
W4A4/W6A6 script exists for LLaMA-2-70B. ``let_attention: exact`` (the default) keeps LET on the
attention and makes it exact under GQA: the v -> o scale has one entry per channel of the KV
heads (v_proj's output size) and is repeated over the query heads sharing that KV head on o_proj's input columns; the q/k
scale has one entry per (KV head, RoPE pair): RoPE rotates channels d and d + head_dim/2 of a head
together, so both get the same scale, which makes the scale commute with the rotation (with partial RoPE,
Phi-3's ``partial_rotary_factor``, the pairs are d and d + rotary/2 and each channel RoPE leaves alone has
its own entry: ``adapter.rotary_dim``). With the
quantizers off the transformed block computes exactly the FP function (see the tests).
``let_attention: off`` has LET on post_attention_layernorm -> gate/up only, no LET on q/k/v/o: the
QLLM paper's "OmniQuant*" rows on LLaMA-2-70B. Without GQA both modes are available too.

``aug_loss`` adds the official ``--aug_loss`` term: MSE against the FP block applied to the
quantized model's inputs (OmniQuant quantize/omniquant.py L164, L212-215, L259-262).

Differences from the official code, on purpose, each an option whose other value is the official
behaviour (Args below): the SmoothQuant initial scale takes max|W| over all consumers of a pair
(``let_init``; the official code takes one linear per pair), sample order is shuffled per epoch with
the run's seed (``shuffle``; the official loop goes in order), the zero point rounds with a
straight-through estimator (``zero_point_grad``; the official one has no gradient). Q/K/V are
quantized (per token and head) when the bit spec says so (``quant.attention``, harness/quant/attention.py),
as in the official layer, and LET trains with them on.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import PretrainedConfig

from harness import (
    BitSpec,
    ConfigError,
    Method,
    MethodConfig,
    QuantContext,
    QuantizeResult,
    QuantLinear,
    get_adapter,
    quantize_block,
    quantize_weight,
    register_method,
)
from harness.adapter import LlamaAdapter, ScalePair
from harness.engine.blockwise import mean_squared_error, run_blockwise, train
from harness.engine.calibration_stats import SCALE_CLAMP_MIN, smoothing_scales
from harness.engine.hooks import BlockHooks, BlockJob
from harness.method import WorkingMemory, keyed_when_set, option
from harness.quant.quantizer import group_view, set_zero_point_grad, weight_quant_params

log = logging.getLogger(__name__)

# Scales closer to zero than this are pushed out to it (straight-through): the official code does
# the same so that 1/s stays finite under mixed precision.
SCALE_FLOOR = 1e-2


@dataclass(frozen=True)
class OmniQuantConfig(MethodConfig):
    """OmniQuant-style options, each with its one-line meaning; the longer notes:

    max_samples: fake-quantized training is slow on CPU, so the CPU demo trains on a few windows.
    let_attention: "off" is the QLLM paper's "OmniQuant*" rows on LLaMA-2-70B.
    let_init: "official" takes max|W| of one linear per pair, with max|X| clamped to >= 1e-5 as well:
        the official code matches its pairs dict {"q_proj": "qkv", "o_proj": "out", "up_proj": "fc1"}
        against the linears' names and takes ``module.weight.abs().max(dim=0)[0]`` of q_proj, o_proj
        and up_proj (OpenGVLab/OmniQuant 95fae1bd quantize/omniquant.py L64-68, L225-231; the first
        commit took the signed max, changed to abs in ae39458). Under GQA the official v -> o scale
        (one entry per o_proj input column) does not fit v_proj's fewer output rows; both modes take
        max|X| and max|W| over the query heads sharing a KV head, which is the official scale when
        every query head has its own KV head.
    shuffle: false is the official loop (quantize/omniquant.py L254-255, ``index = j * batch_size``).
    zero_point_grad: "none" is the official UniformAffineQuantizer (quantize/quantizer.py L155-159),
        set on every quantizer of the block while it trains (LWC weights, activations, Q/K/V).
        Forward values are the same.
    init_loss: one more pass of the block over every calibration sample (about 8% of the method's
        time at 2 epochs); the official code has no such pass. It changes no result.
    low_memory: each LET-scaled, clipped, fake-quantized weight is computed again in the backward
        (``QuantLinear.recompute_weight``). The same results bit for bit (tested); the peak of a
        training step drops by about three float32 copies of the block's weights, and a step costs
        one more weight transform per linear (measured on CPU: 7% more time on smollm2-135m, 38% at
        hidden 2048, where the transforms of 46 MB weights are memory-bound).
    """

    epochs: int = option(20, "training epochs per block (official: 20; 0 = initialisation only)")
    lwc: bool = option(True, "learn weight clipping (LWC)")
    let: bool = option(True, "learn the equivalent transform: channel scales between each norm or linear and its consumers (LET)")
    lwc_lr: float = option(1e-2, "AdamW learning rate of the clipping parameters (official 1e-2)")
    let_lr: float = option(5e-3, "AdamW learning rate of the scales (official 5e-3; 1e-3 for LLaMA-2 W4A4)")
    alpha: float = option(0.5, "SmoothQuant migration strength of the initial scales (official 0.5; 0.75 for LLaMA-2 W4A4)")
    batch_size: int = option(1, "calibration samples per step (official 1)")
    lwc_init: float = option(4.0, "initial clipping gamma and beta (sigmoid(4) = 0.982 of the min/max range)")
    max_samples: int | None = option(None, "train on the first N calibration windows only (null = all, as the official code)")
    aug_loss: bool = option(False, "add an MSE term against the FP block on the quantized inputs (official --aug_loss, LLaMA-1 W4A4)")
    let_attention: Literal["exact", "off"] = option(
        "exact", "LET also on input_layernorm -> q/k/v, v -> o and q/k, GQA-aware; off = only post_attention_layernorm -> gate/up")
    # added after runs were keyed: at their defaults they stay out of run keys (harness.method)
    let_init: Literal["pair", "official"] = keyed_when_set(
        "pair", "max|W| of the initial scales over every consumer of the pair; official = of one linear per pair (notes above)")
    shuffle: bool = keyed_when_set(True, "a new sample order every epoch, seeded by the run's seed; false = in order (official)")
    zero_point_grad: Literal["ste", "none"] = keyed_when_set(
        "ste", "zero points round with a straight-through estimator, so the range gets a gradient; none = official plain round")
    init_loss: bool = keyed_when_set(False, "also record each block's loss at the initialisation (one more pass; changes no result)")
    low_memory: bool = keyed_when_set(False, "recompute the scaled, clipped weights in the backward: same results, less memory, more time")
    weight_solver: str = keyed_when_set("rtn", "rtn only: its learned weight clipping (LWC) is how it rounds weights")

    def __post_init__(self) -> None:
        if self.weight_solver != "rtn":
            raise ConfigError(f"weight_solver: {self.weight_solver!r} is not allowed for omniquant: its learned weight clipping (LWC) is how it rounds weights; use rtn")
        if self.epochs < 0:
            raise ConfigError(f"epochs: {self.epochs} is not allowed; use an integer >= 0")
        for name in ("lwc_lr", "let_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: {getattr(self, name)} is not allowed; use a positive learning rate")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha: {self.alpha} is not allowed; use a number in [0, 1]")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples: {self.max_samples} is not allowed; use a positive integer or null")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: {self.batch_size} is not allowed; use a positive integer")


class LearnableClipQuantizer(nn.Module):
    """Weight quantizer with learnable clipping factors per row of the grouped weight (LWC)."""

    zero_point_grad: bool = True  # off: no gradient through the zero point (harness.quant.quantizer)

    def __init__(self, spec: BitSpec, weight: torch.Tensor, init: float = 4.0) -> None:
        super().__init__()
        rows = group_view(weight.detach(), spec).shape[0]
        self.spec, self.enabled = spec, spec.quantizes_weights
        self.gamma = nn.Parameter(torch.full((rows, 1), init, device=weight.device))  # upper bound
        self.beta = nn.Parameter(torch.full((rows, 1), init, device=weight.device))  # lower bound

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return quantize_weight(w, self.spec, clip_min=torch.sigmoid(self.beta), clip_max=torch.sigmoid(self.gamma),
                               zero_point_grad=self.zero_point_grad)

    def quant_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipped range's scale and zero point (what an exporter writes beside the integer weights)."""
        return weight_quant_params(w, self.spec, clip_min=torch.sigmoid(self.beta), clip_max=torch.sigmoid(self.gamma))


class _FloorSTE(torch.autograd.Function):
    """|s| < floor -> sign(s) * floor in the forward pass; identity gradient."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, floor: float) -> torch.Tensor:  # type: ignore[override]
        small = s.abs() < floor
        sign = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
        return torch.where(small, sign * floor, s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class LETScales(nn.Module):
    """The learnable scales of one block and their layout on each weight (GQA-aware), at the adapter's names.

    The q/k scale exists only where the family lets q_proj's and k_proj's outputs be scaled
    (``adapter.refusal("transform_qk")``: not through Qwen3's and Gemma3's per-head Q/K norms).
    """

    def __init__(self, adapter: LlamaAdapter, hidden: int, heads: int, kv_heads: int, head_dim: int, device: torch.device,
                 attention: bool = True) -> None:
        super().__init__()
        self.adapter = adapter
        self.heads, self.kv_heads, self.head_dim, self.attention = heads, kv_heads, head_dim, attention
        ones = dict(device=device, dtype=torch.float32)
        self.fc1 = nn.Parameter(torch.ones(hidden, **ones))  # mlp_in: the MLP's input norm -> gate/up
        if attention:
            self.qkv = nn.Parameter(torch.ones(hidden, **ones))  # attn_in: the attention's input norm -> q/k/v
            self.out = nn.Parameter(torch.ones(kv_heads * head_dim, **ones))  # attn_out: v_proj -> o_proj
            if adapter.refusal("transform_qk") is None:  # q rows / s, k rows * s: one per RoPE pair, one per channel RoPE leaves
                self.rotary = adapter.rotary_dim(head_dim)
                self.qk = nn.Parameter(torch.ones(kv_heads, head_dim - self.rotary // 2, **ones))

    @property
    def has_qk(self) -> bool:
        return "qk" in self._parameters

    def get(self, name: str) -> torch.Tensor:
        return _FloorSTE.apply(getattr(self, name), SCALE_FLOOR)

    def per_query_head(self, per_kv_head: torch.Tensor) -> torch.Tensor:
        """(kv_heads, head_dim) -> flat (heads * head_dim): query head h reads KV head h // group."""
        return per_kv_head.repeat_interleave(self.heads // self.kv_heads, dim=0).reshape(-1)

    def qk_kv(self) -> torch.Tensor:
        qk = self.get("qk")  # (kv_heads, head_dim): channels d and d + rotary / 2 (a RoPE pair) tied, then the rest
        return torch.cat([qk[:, :self.rotary // 2], qk], dim=-1)

    def factors(self) -> dict[str, tuple[str, torch.Tensor | None, torch.Tensor | None]]:
        """Per parametrized module: (kind, row factor, column factor); a linear's weight becomes row * W * col
        (``adapter.scaled_weight``), a norm's factor is multiplied by col (``adapter.scaled_norm_weight``)."""
        a, fc1 = self.adapter, self.get("fc1")
        mlp = {a.mlp_in.producer: ("norm", None, 1.0 / fc1), **{name: ("linear", None, fc1) for name in a.mlp_in.consumers}}
        if not self.attention:
            return mlp
        qkv, out = self.get("qkv"), self.get("out")
        qk = self.qk_kv() if self.has_qk else None
        q, k, v = a.qkv_names
        return {
            **mlp,
            a.attn_in.producer: ("norm", None, 1.0 / qkv),
            q: ("linear", None if qk is None else 1.0 / self.per_query_head(qk), qkv),
            k: ("linear", None if qk is None else qk.reshape(-1), qkv),
            v: ("linear", 1.0 / out, qkv),
            a.attn_out.consumers[0]: ("linear", None, self.per_query_head(out.view(self.kv_heads, self.head_dim))),
        }


class _Scaled(nn.Module):
    """Parametrization ``t -> row * t * col`` with factors recomputed from the scales on each access."""

    def __init__(self, scales: LETScales, target: str, role: str) -> None:
        super().__init__()
        self._scales = [scales]  # a list, so the scales are not registered as this module's parameters
        self.target, self.role = target, role

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        scales = self._scales[0]
        kind, row, col = scales.factors()[self.target]
        if self.role == "bias":
            return t if row is None else t * row
        if kind == "norm":
            return scales.adapter.scaled_norm_weight(t, col)
        return scales.adapter.scaled_weight(t, row, col)


@dataclass
class BlockState:
    """One block while it is being calibrated."""

    layer: nn.Module
    linears: dict[str, QuantLinear]
    scales: LETScales | None
    clips: list[LearnableClipQuantizer] = field(default_factory=list)

    def parameter_groups(self, config: OmniQuantConfig) -> list[dict]:
        groups = []
        if self.scales is not None:
            groups.append({"params": list(self.scales.parameters()), "lr": config.let_lr})
        if self.clips:
            groups.append({"params": [p for c in self.clips for p in c.parameters()], "lr": config.lwc_lr})
        return groups


def attach(layer: nn.Module, spec: BitSpec, adapter: LlamaAdapter, geometry: tuple[int, int, int],
           act_max: dict[str, torch.Tensor] | None, config: OmniQuantConfig) -> BlockState:
    """Swap the block's linears for ``QuantLinear`` and put LWC / LET on them (not yet folded)."""
    for p in layer.parameters():
        p.requires_grad_(False)  # only the clipping factors and scales are trained
    linears = quantize_block(layer, spec, adapter)
    linears.update({n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear) and n not in linears})
    for q in linears.values():
        q.recompute_weight = config.low_memory
    clips = []
    if config.lwc:
        for q in linears.values():
            q.weight_quant = LearnableClipQuantizer(spec, q.weight, config.lwc_init)
            clips.append(q.weight_quant)
    scales = None
    if config.let:
        heads, kv_heads, head_dim = geometry
        device = next(layer.parameters()).device
        scales = LETScales(adapter, layer.get_submodule(adapter.attn_in.producer).weight.numel(), heads, kv_heads, head_dim,
                           device, attention=config.let_attention == "exact")
        if act_max is not None:
            _init_scales(scales, layer, adapter, act_max, config.alpha, config.let_init)
        for target in scales.factors():
            module = layer.get_submodule(target)
            parametrize.register_parametrization(module, "weight", _Scaled(scales, target, "weight"), unsafe=True)
            if getattr(module, "bias", None) is not None:
                parametrize.register_parametrization(module, "bias", _Scaled(scales, target, "bias"), unsafe=True)
    if config.zero_point_grad == "none":
        set_zero_point_grad(layer, False)  # LWC weights, the linears' inputs, Q/K/V (all in the block)
    return BlockState(layer, linears, scales, clips)


@torch.no_grad()
def _init_scales(scales: LETScales, layer: nn.Module, adapter: LlamaAdapter, act_max: dict[str, torch.Tensor], alpha: float,
                 let_init: str = "pair") -> None:
    official = let_init == "official"

    def init(pair: ScalePair, official_consumer: int, act: torch.Tensor | None = None,
             weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        # official: the one consumer its pairs dict names, and act.clamp(min=1e-5) (OmniQuant
        # quantize/omniquant.py L229-230)
        if weights is None:
            consumers = [pair.consumers[official_consumer]] if official else pair.consumers
            weights = [layer.get_submodule(c).weight for c in consumers]
        act = act_max[pair.consumers[0]] if act is None else act
        return smoothing_scales(act.clamp(min=SCALE_CLAMP_MIN) if official else act, weights, alpha)

    scales.fc1.copy_(init(adapter.mlp_in, 1))  # up_proj (gate_proj, up_proj)
    if not scales.attention:
        return
    scales.qkv.copy_(init(adapter.attn_in, 0))  # q_proj
    # o_proj's input columns come per query head; the scale lives per KV-head channel, so take the
    # max over the query heads that share a KV head (both for X and for W).
    group = scales.heads // scales.kv_heads
    o_act = act_max[adapter.attn_out.consumers[0]].view(scales.kv_heads, group, scales.head_dim).amax(dim=1)
    o_w = layer.get_submodule(adapter.attn_out.consumers[0]).weight.detach().abs()
    o_w = o_w.view(o_w.shape[0], scales.kv_heads, group, scales.head_dim).amax(dim=2).reshape(o_w.shape[0], -1)
    scales.out.copy_(init(adapter.attn_out, 0, o_act.reshape(-1), [o_w]))


@torch.no_grad()
def fold(state: BlockState) -> None:
    """Fold the scales into plain norm/linear weights, then freeze the linears (clipping folded in)."""
    for module in list(state.layer.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for q in state.linears.values():
        q.freeze()
    state.scales = None


def block_loss(job: BlockJob, batch_size: int = 1) -> float:
    """MSE of the job's (current) blocks on the quantized inputs against the FP targets."""
    return mean_squared_error(job.forward_all(job.q_inputs, batch_size=batch_size), job.targets)


@register_method
class OmniQuant(Method):
    name = "omniquant"
    description = "OmniQuant-style block-wise training of weight clipping (LWC) and channel scales (LET)"
    config_class = OmniQuantConfig

    def working_memory(self, config: PretrainedConfig) -> WorkingMemory:
        """What autograd keeps of the weights for a step's backward: the LET-scaled and fake-quantized
        weights and their intermediates (measured: peak RSS 0.9 GB above RTN's on a 32-layer hidden-2048
        model, blocks of 0.2 GB in float32); with ``low_memory`` one linear's at a time."""
        return WorkingMemory(weight_copies=0.5 if self.config.low_memory else 1.0)

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        calibration = self.require_calibration(calibration)
        cfg: OmniQuantConfig = self.config  # type: ignore[assignment]
        if cfg.max_samples is not None:
            calibration = calibration[: cfg.max_samples]
        adapter = get_adapter(model)
        # Each LET pair's consumers share one input: the first consumer's input stands for the pair.
        pair_inputs = tuple(pair.consumers[0] for pair in (adapter.attn_in, adapter.attn_out, adapter.mlp_in))

        def solve(job: BlockJob) -> dict:
            t0 = time.perf_counter()
            # aug_loss target: the FP block on the quantized model's inputs, taken before the block is
            # quantized (OmniQuant quantize/omniquant.py L164, L212-215: fp_inps_2 = FP qlayer(quant_inps))
            fp_on_q = job.forward_all(job.q_inputs) if cfg.aug_loss else None
            act = [rec.abs_max for rec in job.inputs] if cfg.let else [None] * len(job.layers)
            states = [attach(layer, spec, job.adapter, job.attention_geometry(), a, cfg) for layer, a in zip(job.layers, act)]
            groups = [g for s in states for g in s.parameter_groups(cfg)]
            # the loss at the initialisation (SmoothQuant scales, clip 0.982), when asked; skipped when nothing is trained
            init_loss = block_loss(job, cfg.batch_size) if cfg.epochs and cfg.init_loss else None

            def loss_fn(idx: torch.Tensor) -> torch.Tensor:
                out = job.forward(job.rows(job.q_inputs, idx)).float()
                loss = F.mse_loss(out, job.rows(job.targets, idx))
                if fp_on_q is not None:  # both terms weight 1 (OmniQuant quantize/omniquant.py L259-262)
                    loss = loss + F.mse_loss(out, job.rows(fp_on_q, idx))
                return loss

            history = train(groups, loss_fn, len(job.q_inputs), epochs=cfg.epochs, batch_size=cfg.batch_size,
                            seed=context.seed + job.index, shuffle=cfg.shuffle, label=job.label, device=job.device)
            for s in states:
                fold(s)
            return {"init_loss": init_loss, "epoch_losses": history, "seconds": round(time.perf_counter() - t0, 3),
                    **({"loss": history[-1]} if history else {})}

        t0 = time.perf_counter()
        hooks = BlockHooks(solve=solve, record=pair_inputs if cfg.let else ())
        blocks = run_blockwise(model, calibration, hooks, device=context.device, desc="omniquant", progress=context.progress)
        for b in blocks:
            b.pop("loss", None)
        return QuantizeResult(model, {"blocks": blocks, "wall_s": round(time.perf_counter() - t0, 3),
                                      "lwc": cfg.lwc, "let": cfg.let, "let_attention": cfg.let_attention,
                                      "aug_loss": cfg.aug_loss, "epochs": cfg.epochs,
                                      "samples": len(calibration)})
