"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into the weights, then quantize.

LLM activations have a few channels whose magnitude is 10-100x the rest, so a per-token activation
quantizer spends its range on them. SmoothQuant divides every input channel j of a linear by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and multiplies the matching weight column by s_j: X W^T = (X / s)(W * s)^T, so the FP function is
unchanged while the activation becomes flatter and the weight absorbs part of the difficulty.
alpha = 0.5 splits it evenly (the official default); the official LLaMA-2 W8A8 settings are 0.85
(7B/13B) and 0.9 (70B), see ``configs/smoothquant-llama2-w8a8.yaml``.

As in the official code (mit-han-lab/smoothquant, ``smooth_lm`` / ``smooth_ln_fcs_llama_like``)
for LLaMA-like blocks:

- max|X_j| is the running max over all calibration tokens of the input of q_proj (shared by k, v)
  and of gate_proj (shared by up) in the FP model, gathered with forward hooks (here during the
  block-wise engine's teacher pass, one block on the device at a time);
- max|W_j| is taken over the concatenated linears of a pair (q, k, v or gate, up), clamped to
  >= 1e-5, and s is clamped to >= 1e-5, both as the official code does;
- 1/s is folded into the norm that produces the input (the adapter's ``attn_in`` and ``mlp_in``
  producers: LLaMA's input_layernorm and post_attention_layernorm, Gemma3's input_layernorm and
  pre_feedforward_layernorm, whose factor 1 + w is divided), s into the input columns of every linear
  of the pair (``adapter.fold_scale``).

o_proj and down_proj are not smoothed. Their inputs (the attention context, and SiLU(gate) * up)
come from no op that could absorb 1/s without changing the network: the attention mixes v_proj's
output across tokens and heads, and the SwiGLU product is nonlinear in gate. The official code
therefore smooths only the norm-fed pairs for LLaMA (for OPT likewise only the LayerNorm-fed
qkv and fc1). Every linear is quantized afterwards, smoothed or not, per the bit spec.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from harness import (
    BitSpec,
    ConfigError,
    Method,
    MethodConfig,
    QuantContext,
    QuantizeResult,
    get_adapter,
    register_method,
)
from harness.engine.blockwise import run_blockwise
from harness.engine.hooks import BlockHooks, BlockJob
from harness.engine.calibration_stats import max_over_median, smoothing_scales
from harness.engine.solvers import SolverOptions, check_solver, solve_block
from harness.method import keyed_when_set, option
from harness.quant.qlinear import quant_linears

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SmoothQuantConfig(MethodConfig):
    """SmoothQuant's one option. Official alpha: 0.5 default, 0.85 LLaMA-2 7B/13B, 0.9 LLaMA-2 70B."""

    alpha: float = option(0.5, "migration strength in [0, 1]: 0 leaves activations alone (s = 1 / max|W|), 1 moves all their range into the weights")
    # added after runs were keyed: at its default it stays out of run keys (harness.method)
    weight_solver: Literal["rtn", "gptq"] = keyed_when_set(
        "rtn", "how the smoothed weights are rounded: rtn, or gptq (harness.engine.solvers, the official GPTQ defaults)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha: {self.alpha} is not allowed; use a number in [0, 1]")
        check_solver(self.weight_solver)


@torch.no_grad()
def smooth(model: nn.Module, calibration: torch.Tensor, alpha: float, context: QuantContext, spec: BitSpec | None = None,
           solver: SolverOptions = SolverOptions()) -> dict:
    """Smooth every norm-fed pair of every block in place (and quantize it for ``spec``); return outlier stats.

    The statistics come from the block-wise engine's teacher pass (FP blocks on the FP model's
    hidden states: exactly the official one-pass hooks over the FP model), one block on the device
    at a time, so the whole model never needs to be there.

    The stats compare max|X| over channels / median at each smoothed input before and after; after
    smoothing the per-channel max is exactly max|X_j| / s_j since the norm output is divided by s.
    """
    adapter = get_adapter(model)
    pairs = (adapter.attn_in, adapter.mlp_in)

    def solve(job: BlockJob) -> dict:
        # returned per block (not kept in a closure) so that a run resumed from a checkpoint has them all
        ratios: dict[str, dict[str, list[float]]] = {p.name: {"before": [], "after": []} for p in pairs}
        for layer, record in zip(job.layers, job.inputs):
            for pair in pairs:
                # The pair's linears share one input; its first consumer's hook saw it.
                x_max = record.abs_max[pair.consumers[0]]
                scales = smoothing_scales(x_max, [layer.get_submodule(c).weight for c in pair.consumers], alpha)
                job.adapter.fold_scale(layer, pair, scales)
                ratios[pair.name]["before"].append(max_over_median(x_max))
                ratios[pair.name]["after"].append(max_over_median(x_max / scales))
            if spec is not None:  # the job's inputs are the student's: what the smoothed, quantized model so far feeds
                solve_block(job, layer, spec, solver)
        return {"ratios": ratios}

    hooks = BlockHooks(solve=solve, record=tuple(p.consumers[0] for p in pairs))
    jobs = run_blockwise(model, calibration, hooks, device=context.device, desc="smoothquant", progress=context.progress)
    ratios = {p.name: {when: [r for job in jobs for r in job["ratios"][p.name][when]] for when in ("before", "after")}
              for p in pairs}
    summary = {name: {when: statistics.fmean(v) for when, v in r.items()} for name, r in ratios.items()}
    for name, r in summary.items():
        log.info("smoothquant %s: act max/median (mean over layers) %.1f -> %.1f", name, r["before"], r["after"])
    return {"act_max_over_median": summary, "act_max_over_median_per_layer": ratios}


@register_method
class SmoothQuant(Method):
    name = "smoothquant"
    description = "SmoothQuant: per-channel scales move activation outliers into the weights, then RTN"
    config_class = SmoothQuantConfig

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        calibration = self.require_calibration(calibration)
        stats = smooth(model, calibration, self.config.alpha, context, spec, SolverOptions(self.config.weight_solver))
        swapped = sum(1 for _ in quant_linears(model))
        return QuantizeResult(model, {"alpha": self.config.alpha, "quantized_linears": swapped, **stats})
