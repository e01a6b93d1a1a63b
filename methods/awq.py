"""AWQ (Lin et al., MLSys 2024): activation-aware weight scaling and clipping, then round to nearest.

A few input channels of every linear carry much larger activations than the rest, and the rounding
error of their weights costs the most. AWQ scales those weight columns up by s (and the input
down by s, folded into the operation that produces it, so the FP model is unchanged) before
rounding, which shrinks their relative rounding error, then clips each weight group's range where
that lowers the output error. Both are searched per block on the FP model's activations, as the
official code does (mit-han-lab/llm-awq d6e797a, ``awq/quantize/pre_quant.py`` ``run_awq``,
``auto_scale.py``, ``auto_clip.py``):

Scale search (``auto_scale_block``), per scaling group of a block (the adapter's pairs, named here as
LLaMA's; Gemma3's mlp_in norm is pre_feedforward_layernorm):

- ``attn_in``: input_layernorm -> q/k/v, the loss on the attention's output (o_proj FP);
- ``attn_out``: v_proj -> o_proj, the loss on o_proj's output, only where v_proj's and o_proj's
  weights have the same shape, i.e. without grouped-query attention (the official check,
  llm-awq PR 67): under GQA one v_proj row feeds several heads' o_proj columns, which would need
  one scale per group of heads. smollm2-135m (9 heads, 3 KV heads) and LLaMA-2-70B skip it;
- ``mlp_in``: post_attention_layernorm -> gate/up, the loss on the MLP's output (down_proj FP);
- ``mlp_out``: up_proj -> down_proj, the loss on down_proj's output.

In a mixture-of-experts block (the adapter's ``mlp_outs``, ``routers``) ``mlp_in`` is the norm -> every expert's
gate/up, the loss on the routed MLP's output, the router reading the scaled input FP (its columns take s, so it
routes as before); each expert has its own ``mlp_out`` group, searched on the tokens routed to it (an expert that
none of the kept samples reaches keeps s = 1 and its range). The clip search of an expert's linear sees its
routed tokens too (``adapter.input_groups``).

For ratio r in {0, 1/n_grid, ..., (n_grid - 1)/n_grid}: s = a^r clamped to >= 1e-4, divided by
sqrt(max(s) min(s)), where a is the **mean** |x| of each input channel over every calibration
token (the official ``get_act_scale``; its variable is called ``x_max``, but it is a mean). The
group's linears get W' = Q(W s) / s, the inspected module runs on the FP inputs, and the ratio with
the smallest mean squared output error wins (the first one on ties; r = 0 is s = 1, no scaling).
Only the group's own linears are quantized during its search; activations are never quantized
in the search (AWQ is a weight-only method). The scales are folded by the adapter
(``adapter.fold_scale``) into the producer (a norm's factor / s, Gemma's 1 + w included, or the producer
linear's output rows and bias / s) and the consumers' input columns (* s).

Clip search (``auto_clip_block``), after scaling, per linear except q_proj and k_proj (skipped by
the official code: "due to qk bmm, it is hard to clip precisely"): for every output channel and
weight group, the range [-m, m] with m = max|W_group| (1 - i / clip_grid), i < max_shrink * clip_grid,
whose quantized group's partial output on a token subsample (every (tokens // clip_tokens)-th of
the scaled inputs) is closest to the unclipped FP group's in mean squared error. The official code
evaluates it as (X * W).sum over an (out, tokens, groups, group size) tensor per candidate, which is
most of its time on CPU; here the error of a group is the same quadratic form dW^T (X^T X / t) dW
with dW = Q(clamp(W)) - W and the group's Gram matrix of the inputs computed once, so a candidate
costs out x in x group size instead of out x tokens x in.

The weights are then rounded by the sweep's bit spec with ``weight_solver`` (``rtn``: min/max
round to nearest, the official ``pseudo_quantize_tensor`` for asymmetric ranges, up to its zero point
being clamped to the grid, which differs only for a group whose weights all have one sign; ``gptq``:
GPTQ on the scaled and clipped weights). The next block's search inputs are the FP model's
activations (the official code computes them before scaling and clipping the block), while the
block-wise engine carries the quantized model's activations along for the weight solver.
"""
from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from harness import (
    BitSpec,
    ConfigError,
    Method,
    MethodConfig,
    QuantContext,
    QuantizeResult,
    ScalePair,
    get_adapter,
    option,
    quantize_weight,
    register_method,
)
from harness.adapter import LlamaAdapter
from harness.engine.blockwise import run_blockwise
from harness.engine.hooks import BlockHooks, BlockJob
from harness.engine.solvers import SolverOptions, check_solver, solve_block
from harness.method import WorkingMemory

log = logging.getLogger(__name__)

# The official search's floor on the scales before normalising them.
SCALE_FLOOR = 1e-4
# Calibration tokens per forward pass of the search (the official code runs all of them at once).
TOKENS_PER_PASS = 4096


@dataclass(frozen=True)
class AWQConfig(MethodConfig):
    """AWQ's options, as the official ``run_awq`` / ``auto_scale`` / ``auto_clip`` defaults."""

    auto_scale: bool = option(True, "search per-channel scales for each scaling group (official auto_scale)")
    n_grid: int = option(20, "scale ratios tried per group: r = 0, 1/n, ..., (n-1)/n, s = mean|x|^r (official n_grid 20)")
    auto_clip: bool = option(True, "search each weight group's clipping range after scaling (official mse_range)")
    clip_grid: int = option(20, "clip step: ranges max|W| (1 - i / clip_grid) are tried (official n_grid 20)")
    max_shrink: float = option(0.5, "the clip search tries i < max_shrink * clip_grid, i.e. shrinks the range by up to this much")
    clip_tokens: int = option(512, "calibration tokens the clip search subsamples, every (tokens // clip_tokens)-th (official 512)")
    search_samples: int = option(
        0, "calibration samples both searches see, 0 = all (official); their inputs are kept in float32 while a block is searched")
    weight_solver: Literal["rtn", "gptq"] = option(
        "rtn", "how the scaled, clipped weights are rounded: rtn, or gptq (harness.engine.solvers, the official GPTQ defaults)")

    def __post_init__(self) -> None:
        for name in ("n_grid", "clip_grid", "clip_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: {value!r} is not allowed; use a positive integer")
        if not isinstance(self.search_samples, int) or isinstance(self.search_samples, bool) or self.search_samples < 0:
            raise ConfigError(f"search_samples: {self.search_samples!r} is not allowed; use 0 (all) or a positive integer")
        if not 0.0 < self.max_shrink < 1.0:
            raise ConfigError(f"max_shrink: {self.max_shrink!r} is not allowed; use a number in (0, 1)")
        check_solver(self.weight_solver)


@dataclass(frozen=True)
class ScaleGroup:
    """One scaling group: its producer/consumer pair and the module whose output error is measured."""

    pair: ScalePair
    inspect: Callable[[torch.Tensor], torch.Tensor]


def _batches(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` (samples, seqlen, channels) in batches of about TOKENS_PER_PASS tokens."""
    rows = max(1, TOKENS_PER_PASS // x.shape[1])
    return list(x.split(rows))


def act_scale(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| per channel over every token: what the official search calls ``x_max`` (``get_act_scale``)."""
    return x.abs().reshape(-1, x.shape[-1]).float().mean(0)


def ratio_scales(act: torch.Tensor, ratio: float) -> torch.Tensor:
    """The official candidate: act^ratio floored at 1e-4, normalised so that max(s) min(s) = 1."""
    s = act.pow(ratio).clamp(min=SCALE_FLOOR)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(x: torch.Tensor, linears: list[nn.Linear], inspect: Callable[[torch.Tensor], torch.Tensor],
                 spec: BitSpec, n_grid: int) -> tuple[torch.Tensor, float, list[float]]:
    """The scales of ``linears`` (which all read ``x``) that minimise the mean squared error of ``inspect``'s
    output when their weights are W' = Q(W s) / s; returns (scales, best ratio, loss per ratio)."""
    batches = _batches(x)
    reference = [inspect(b) for b in batches]
    count = sum(r.numel() for r in reference)
    act = act_scale(x)
    originals = [linear.weight.data for linear in linears]
    losses: list[float] = []
    try:
        for step in range(n_grid):
            s = ratio_scales(act, step / n_grid).to(originals[0].dtype)
            for linear, w in zip(linears, originals):
                linear.weight.data = quantize_weight(w * s, spec) / s
            error = sum((inspect(b) - r).double().pow(2).sum() for b, r in zip(batches, reference))
            losses.append(float(error) / count)
    finally:
        for linear, w in zip(linears, originals):
            linear.weight.data = w
    best = min(range(n_grid), key=losses.__getitem__)  # the first of equal losses, as the official strict "<"
    return ratio_scales(act, best / n_grid), best / n_grid, losses


def clip_subsample(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """Every (n // tokens)-th of the n calibration tokens (all of them when n < tokens; the official code fails there)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat[:: max(1, flat.shape[0] // tokens)]


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: BitSpec, clip_grid: int, max_shrink: float) -> torch.Tensor:
    """Per output channel and weight group, the clip bound m (out, groups) whose Q(clamp(W, -m, m)) has the
    smallest mean squared partial output error against W on the tokens ``x`` (tokens, in)."""
    out, width = w.shape
    size = spec.w_group or width
    groups = width // size
    xg = x.float().reshape(-1, groups, size)
    gram = torch.einsum("tgk,tgl->gkl", xg, xg) / xg.shape[0]  # (groups, size, size)
    wg = w.float().reshape(out, groups, size)
    full = wg.abs().amax(dim=-1)  # (out, groups)
    errors, bounds = [], []
    for step in range(int(max_shrink * clip_grid)):
        bound = full * (1 - step / clip_grid)
        clipped = torch.maximum(torch.minimum(wg, bound.unsqueeze(-1)), -bound.unsqueeze(-1))
        delta = quantize_weight(clipped.reshape(out, width), spec).reshape(out, groups, size) - wg
        errors.append(torch.einsum("ogk,gkl,ogl->og", delta, gram, delta))
        bounds.append(bound)
    best = torch.stack(errors).argmin(dim=0, keepdim=True)  # the first of equal errors, as the official strict "<"
    return torch.stack(bounds).gather(0, best).squeeze(0)


@torch.no_grad()
def apply_clip(linear: nn.Linear, bound: torch.Tensor) -> None:
    out, groups = bound.shape
    wg = linear.weight.data.view(out, groups, -1)
    b = bound.to(wg).unsqueeze(-1)
    wg.copy_(torch.maximum(torch.minimum(wg, b), -b))


def scale_groups(job: BlockJob, layer: nn.Module) -> list[ScaleGroup]:
    """The official scaling groups of one block (attn_out only without grouped-query attention; one mlp_out per expert)."""
    a = job.adapter
    groups = [ScaleGroup(a.attn_in, lambda x: a.run_attention(layer, x, job.position_embeddings))]
    v, o = (layer.get_submodule(a.attn_out.producer), layer.get_submodule(a.attn_out.consumers[0]))
    if v.weight.shape == o.weight.shape:
        groups.append(ScaleGroup(a.attn_out, o))
    groups.append(ScaleGroup(a.mlp_in, layer.get_submodule(a.mlp_path)))
    groups += [ScaleGroup(pair, layer.get_submodule(pair.consumers[0])) for pair in a.mlp_outs]
    return groups


def recorded_inputs(adapter: LlamaAdapter) -> tuple[tuple[str, ...], dict[str, str]]:
    """The linears whose inputs the teacher pass records (one per group of consumers that read the same tokens), and
    for every consumer the recorded one that stands for its input."""
    groups = [group for pair in adapter.scale_pairs for group in adapter.input_groups(pair)]
    return tuple(dict.fromkeys(g[0] for g in groups)), {name: g[0] for g in groups for name in g}


@torch.no_grad()
def auto_scale_block(job: BlockJob, layer: nn.Module, feats: dict[str, torch.Tensor], spec: BitSpec, n_grid: int
                     ) -> dict[str, float]:
    """Search every scaling group's scales and fold them (``adapter.fold_scale``: exact in FP); return each group's ratio
    (the mean over the experts' mlp_out groups).

    ``feats``: the recorded inputs of each group's first consumer, replaced by the scaled inputs the clip search sees;
    a group whose input was never recorded (an expert no kept sample is routed to) is left unscaled.
    """
    ratios: dict[str, list[float]] = {}
    for group in scale_groups(job, layer):
        pair = group.pair
        x = feats.get(pair.consumers[0])
        if x is None:
            continue
        linears = [layer.get_submodule(n) for n in pair.consumers if n in job.adapter.linear_names]  # not a router
        scales, ratio, _ = search_scale(x, linears, group.inspect, spec, n_grid)
        ratios.setdefault(pair.name, []).append(ratio)
        job.adapter.fold_scale(layer, pair, scales)
        for name in (g[0] for g in job.adapter.input_groups(pair) if g[0] in feats):  # every expert's input too
            feats[name] = feats[name] / scales.to(feats[name])
    return {name: statistics.fmean(values) for name, values in ratios.items()}


@register_method
class AWQ(Method):
    name = "awq"
    description = "AWQ: activation-aware per-channel weight scales and clipping, then round to nearest (Lin et al. 2023)"
    config_class = AWQConfig

    def check(self, spec: BitSpec) -> None:
        if not spec.quantizes_weights:
            raise ConfigError(f"bits: {spec.name} quantizes no weights; AWQ scales and clips weights (e.g. W4A16g128, W3A16)")
        if spec.w_granularity == "tensor" and self.config.auto_clip:
            raise ConfigError("quant.weight_granularity: 'tensor' is not allowed with awq's auto_clip (clipped per channel or "
                              "group); use 'channel' or auto_clip: false")

    def working_memory(self, config: PretrainedConfig) -> WorkingMemory:
        """The recorded inputs of every scaling group, float32, of ``search_samples`` windows (0: all)."""
        return WorkingMemory(samples=self.config.search_samples or None)

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        calibration = self.require_calibration(calibration)
        cfg = self.config
        adapter = get_adapter(model)
        pairs = adapter.scale_pairs
        record, source = recorded_inputs(adapter)  # linears that read the same tokens share one recorded input

        def solve(job: BlockJob) -> dict:
            stats: dict = {"ratio": {}, "clip_shrink": {}}
            clip_skipped = job.adapter.qkv_names[:2]  # q_proj, k_proj: the official auto_clip_block skips "q_" and "k_"
            for layer, inputs in zip(job.layers, job.inputs):
                feats = {name: inputs.first_samples(name) for name in record if name in inputs.samples}
                for name, ratio in (auto_scale_block(job, layer, feats, spec, cfg.n_grid) if cfg.auto_scale else {}).items():
                    stats["ratio"].setdefault(name, []).append(ratio)
                for name in job.adapter.linear_names if cfg.auto_clip else ():
                    if name in clip_skipped or source[name] not in feats:  # not clipped without tokens to measure it on
                        continue
                    linear = layer.get_submodule(name)
                    bound = search_clip(linear.weight.data, clip_subsample(feats[source[name]], cfg.clip_tokens), spec,
                                        cfg.clip_grid, cfg.max_shrink)
                    full = linear.weight.data.float().reshape(*bound.shape, -1).abs().amax(-1)
                    stats["clip_shrink"].setdefault(name, []).append(float((1 - bound / full.clamp_min(1e-12)).mean()))
                    apply_clip(linear, bound)
                solve_block(job, layer, spec, SolverOptions(cfg.weight_solver))
            return stats

        hooks = BlockHooks(solve=solve, record=record, keep_samples=cfg.search_samples or len(calibration))
        jobs = run_blockwise(model, calibration, hooks, device=context.device, desc="awq", progress=context.progress)
        ratios = {p.name: [r for job in jobs for r in job["ratio"].get(p.name, [])] for p in pairs}
        for name, values in ratios.items():
            if values:
                log.info("awq %s: scale ratio mean %.2f over %d blocks", name, statistics.fmean(values), len(values))
        return QuantizeResult(model, {"scale_ratio": ratios, "jobs": jobs})

