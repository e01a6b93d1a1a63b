"""OS+ (Outlier Suppression+, Wei et al., EMNLP 2023): scale activation outlier channels down to a searched threshold.

A few input channels of LLM linears carry activations far above the rest. OS+ picks one threshold
t per scaling site and divides every channel j whose range exceeds it by

    s_j = max(1, max X_j / t, min X_j / -t)

(channels within [-t, t] are left alone), multiplying the consumers' weight columns by s_j, so the
FP function is unchanged: X W^T = (X / s)(W s)^T. t is the candidate whose site output under
weight and activation fake quantization is closest to the FP output on the calibration tokens.

As the official LLaMA path (ModelTC/Outlier_Suppression_Plus 3ba97ae, ``quant_transformer/model/quant_llama.py``
L269-342, ``quantization/migration_llama.py``) does:

- sites: q/k/v (1/s folded into input_layernorm), gate/up (into post_attention_layernorm; Gemma3's
  pre_feedforward_layernorm) and down_proj (into up_proj's output rows; the official ``fuse_migration``
  L33-37 divides up_proj's already-quantized per-channel weight scale by s, which is the same as rounding
  the row divided by s), each folded by the adapter (``fold_scale``, ``fold_shift``). o_proj is not scaled (the official code has no v_proj -> o_proj site; under grouped-query
  attention one v_proj row feeds several heads' o_proj columns, which would need one scale per group);
- candidates (``migration_llama.py`` L179, L185-204): from T = max(|min X|, max X) down to ``t_min``
  (0.1) in max(``min_steps``, int(max(max X, 0) / ``step_unit``)) = max(100, int(max X / 0.5))
  equal steps, the first candidate T meaning s = 1; strict improvement, so the larger t wins ties;
- loss (L126-132): mean over tokens of the squared error summed over output features, between the
  FP site output and the output with Q_a(X / s) and Q_w(W s): the activation quantizer per token and
  the weight quantizer per output channel, both the bit spec's (the official ``quantize`` L80-105
  ignores the candidate range for per-token activations). The site output is the attention context
  before o_proj (``adapter.attention_context``: the family's Q/K norms, the layer's RoPE and sliding
  window, grouped-query heads, the attention's scaling, causal softmax; Q/K/V not quantized, as the
  official search never does), act(gate) * up, and down_proj's output;
- inputs: the official migration runs one forward of its first calibration batch with every
  quantizer on (``solver/calibrate.py`` L107-112), so each site sees the activations of the model
  quantized so far: preceding blocks quantized, and within a block the gate/up site after quantized
  attention, the down_proj site after quantized gate/up. Here the block-wise engine's student
  inputs of the first ``search_samples`` calibration windows go through the block with the linears
  of preceding sites temporarily quantized (RTN) to record each site's input;
- shift (``shift``, off): the official OPT/BLOOM path (``quant_opt.py`` L291-304, ``migration.py``
  L21-29) first centres each channel by z = (max X_j + min X_j) / 2, folded into the norm's bias and
  the consumers' biases (b + W z). LLaMA's RMSNorm has no bias to take it, and the official LLaMA
  path applies no shift; a model without a norm bias refuses ``shift: true``.

The candidates are scored in batches (``batch_mb`` of memory each, one batched matmul per batch)
instead of one at a time: the down_proj inputs of smollm2-135m reach ~3500, so up to ~7000
candidates at one site. Every linear is then rounded by ``weight_solver`` (``rtn``, or ``gptq``
on the migrated weights, whose search still measures RTN weights).
"""
from __future__ import annotations

import contextlib
import logging
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from harness import (
    BitSpec,
    ConfigError,
    LlamaAdapter,
    Method,
    MethodConfig,
    QuantContext,
    QuantizeResult,
    ScalePair,
    get_adapter,
    quantize_activation,
    quantize_block,
    quantize_weight,
    register_method,
)
from harness.engine.blockwise import run_blockwise
from harness.engine.calibration_stats import recording_inputs
from harness.engine.hooks import BlockHooks, BlockJob
from harness.engine.solvers import SolverOptions, check_solver, solve_block
from harness.method import WorkingMemory, keyed_when_set, option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OSPlusConfig(MethodConfig):
    """OS+'s options; the defaults are the official LLaMA settings."""

    min_steps: int = option(100, "fewest threshold steps per site (official 100)")
    step_unit: float = option(0.5, "one threshold step per this much of the site's largest activation when that gives more steps "
                              "(official: max(100, int(max X / 0.5)) steps)")
    t_min: float = option(0.1, "smallest threshold tried (official: 0.1 for LLaMA, 1.0 for OPT and BLOOM)")
    search_samples: int = option(16, "calibration windows the search sees, the first ones (official: its first batch, "
                                 "16 windows in its LLaMA script)")
    shift: bool = option(False, "centre each channel first, z = (max + min) / 2, folded into the norm's and consumers' biases "
                         "(official OPT/BLOOM path; needs a norm with a bias, which LLaMA's RMSNorm lacks)")
    batch_mb: int = option(512, "memory for one batch of threshold candidates scored together, MB (speed only)")
    weight_solver: Literal["rtn", "gptq"] = keyed_when_set(
        "rtn", "how the migrated weights are rounded: rtn, or gptq (harness.engine.solvers, the official GPTQ defaults)")

    def __post_init__(self) -> None:
        for name in ("min_steps", "search_samples", "batch_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: {value!r} is not allowed; use an integer >= 1")
        for name in ("step_unit", "t_min"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not allowed; use a number > 0")
        check_solver(self.weight_solver)


# --- the search -------------------------------------------------------------------------------------

# A site's output: x (K, samples, seqlen, C), one (K, out_i, C) weight and a bias (or None) per consumer
# -> (K, samples * seqlen, out) float32, for K candidates at once.
SiteFn = Callable[[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]], torch.Tensor]


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.flatten(1, 2) @ weight.transpose(1, 2)
    return y if bias is None else y + bias


def linear_site(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> torch.Tensor:
    """down_proj: its output."""
    return _project(x, weights[0], biases[0])


def gated_site(act: Callable[[torch.Tensor], torch.Tensor]) -> SiteFn:
    """gate/up (consumers in that order): act(gate) * up, the input of down_proj."""
    return lambda x, weights, biases: act(_project(x, weights[0], biases[0])) * _project(x, weights[1], biases[1])


def attention_site(adapter: LlamaAdapter, layer: nn.Module, position_embeddings: Any) -> SiteFn:
    """q/k/v (consumers in that order): the attention context before o_proj, as the official ``qkv_function``
    (RoPE on Q and K, each KV head shared by its query heads, causal softmax(Q K^T / sqrt(d)) V) and as the
    block's family computes it (``adapter.attention_context``: Q/K norms, scaling, sliding window)."""

    def fn(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> torch.Tensor:
        K, n, seqlen, _ = x.shape
        q, k, v = (_project(x, w, b).view(K * n, seqlen, -1) for w, b in zip(weights, biases))
        out = adapter.attention_context(layer, q, k, v, position_embeddings)
        return out.reshape(K, n * seqlen, -1)

    return fn


def thresholds(x_max: float, x_min: float, config: OSPlusConfig) -> list[float]:
    """The official candidates, largest first: from max(|min|, max) down by equal steps while >= ``t_min``.

    The official loop subtracts the step from a float, so its last candidate is the one it reaches, not
    exactly ``t_min``. The first candidate (nothing above it) means no scaling; it stands alone when the
    largest activation is below ``t_min``, where the official loop tries nothing and keeps it.
    """
    top = max(-min(x_min, 0.0), max(x_max, 0.0))
    if top <= config.t_min:
        return [top]
    step = (top - config.t_min) / max(config.min_steps, int(max(x_max, 0.0) / config.step_unit))
    grid, t = [], top
    while t >= config.t_min:
        grid.append(t)
        t -= step
    return grid


def outlier_scales(channel_max: torch.Tensor, channel_min: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """s_j = max(1, max X_j / t, min X_j / -t) for each threshold in ``t`` (K,): (K, C) (official ``cac_scale``)."""
    t = t.unsqueeze(-1)
    one = torch.ones((), dtype=channel_max.dtype, device=channel_max.device)
    return torch.maximum(torch.where(channel_max > t, channel_max / t, one), torch.where(channel_min < -t, channel_min / -t, one))


def _quantize_weights(w: torch.Tensor, spec: BitSpec) -> torch.Tensor:
    """Fake-quantize K candidates' (K, out, in) copies of one weight, each as the linear's own weight quantizer would."""
    if spec.w_granularity == "tensor":  # one range per linear: per candidate
        return torch.stack([quantize_weight(c, spec) for c in w])
    return quantize_weight(w.flatten(0, 1), spec).view_as(w)  # ranges per row (or group of a row) either way


@dataclass(frozen=True)
class SearchResult:
    threshold: float
    scales: torch.Tensor  # (C,)
    loss: float  # the site's output error at the threshold
    loss_unscaled: float  # ... and with s = 1 (the first candidate)
    candidates: int


@torch.no_grad()
def search_threshold(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], site: SiteFn,
                     spec: BitSpec, config: OSPlusConfig, scratch_per_candidate: int = 0) -> SearchResult:
    """The threshold whose scales give the lowest site output error; ``x`` is the site's input (samples, seqlen, C).

    Candidates are scored ``K`` at a time, K as many as ``config.batch_mb`` holds at an estimated
    4 x (4 inputs, 2 weights, 4 outputs + ``scratch_per_candidate``) float32 elements each.
    """
    channel_max, channel_min = x.amax(dim=(0, 1)), x.amin(dim=(0, 1))
    grid = thresholds(x.max().item(), x.min().item(), config)
    ts = torch.tensor(grid, dtype=torch.float32, device=x.device)
    reference = site(x.unsqueeze(0), [w.unsqueeze(0) for w in weights], biases)
    per_candidate = 4 * (4 * x.numel() + 2 * sum(w.numel() for w in weights) + 4 * reference.numel() + scratch_per_candidate)
    batch = max(1, config.batch_mb * 2**20 // per_candidate)
    # the best so far as Python numbers: a list of every batch's small loss tensor, kept between the batches'
    # large temporaries, pinned the heap and grew it by ~10 MB a batch (23 GB at smollm2's largest site)
    best, best_loss, unscaled = 0, float("inf"), float("nan")
    for start in range(0, len(grid), batch):
        s = outlier_scales(channel_max, channel_min, ts[start : start + batch])
        xq = quantize_activation(x.unsqueeze(0) / s[:, None, None, :], spec.a_bits, spec.a_symmetric)
        wq = [_quantize_weights(w.unsqueeze(0) * s[:, None, :], spec) for w in weights]
        loss = (site(xq, wq, biases) - reference).pow_(2).sum(-1).mean(-1).nan_to_num_(nan=torch.inf)  # NaN never wins
        del s, xq, wq  # one batch's tensors alive at a time (batch_mb)
        i = int(loss.argmin())  # the first of equal minima: the largest such t, as the official strict "<"
        if start == 0:
            unscaled = loss[0].item()
        if loss[i].item() < best_loss:
            best, best_loss = start + i, loss[i].item()
    return SearchResult(grid[best], outlier_scales(channel_max, channel_min, ts[best]), best_loss, unscaled, len(grid))


# --- the transform ----------------------------------------------------------------------------------

@torch.no_grad()
def migrate(layer: nn.Module, pair: ScalePair, scales: torch.Tensor, shift: torch.Tensor | None = None,
            adapter: LlamaAdapter | None = None) -> None:
    """Make the consumers' input (x - shift) / scales in place, folded into ``pair``'s producer and consumers.

    The producer (a norm: its factor and bias; a linear: its output rows and bias) outputs
    (x - shift) / s, and each consumer computes W s ((x - shift) / s) + (b + W shift) = W x + b: the FP
    function is unchanged (``adapter.fold_shift``, then ``adapter.fold_scale``). A shift needs a producer
    whose output it can move: a norm with a bias, or a linear (which gets a bias if it has none).
    ``adapter``: the block's family (default: the LLaMA layout's, whose operations suit any module with a weight).
    """
    adapter = adapter or LlamaAdapter()
    if shift is not None:
        refuse_unshiftable(pair, layer.get_submodule(pair.producer))
        adapter.fold_shift(layer, pair, shift)
    adapter.fold_scale(layer, pair, scales)


def refuse_unshiftable(pair: ScalePair, producer: nn.Module) -> None:
    """A one-line ``ConfigError`` when ``producer`` (a norm without a bias, as LLaMA's RMSNorm) cannot absorb a shift."""
    if getattr(producer, "bias", None) is None and not isinstance(producer, nn.Linear):
        raise ConfigError(f"shift: true needs a bias on {pair.producer} to absorb the shift; {type(producer).__name__} has none "
                          "(the official LLaMA path applies no shift); use shift: false")


@contextlib.contextmanager
def rtn_quantized(layer: nn.Module, spec: BitSpec, job: BlockJob, names: tuple[str, ...]) -> Iterator[None]:
    """Within the block, the linears ``names`` fake-quantize their inputs and (current) weights as RTN; plain linears after."""
    swapped = quantize_block(layer, spec, job.adapter, include=lambda name, _linear: name in names)
    try:
        yield
    finally:
        for name, qlinear in swapped.items():
            parent, _, attr = name.rpartition(".")
            linear = nn.Linear(qlinear.in_features, qlinear.out_features, bias=False, device="meta")
            linear.weight, linear.bias = qlinear.weight, qlinear.bias
            setattr(layer.get_submodule(parent), attr, linear)


def site_input(job: BlockJob, layer: nn.Module, name: str, samples: int) -> torch.Tensor:
    """The input of ``name`` (samples, seqlen, C) float32 while the first ``samples`` student inputs run through ``layer``."""
    with recording_inputs(layer, (name,), keep_samples=samples) as record:
        for i in range(samples):
            job.forward(job.rows(job.q_inputs, slice(i, i + 1)), [layer])
    return record.first_samples(name)


def suppress_block(job: BlockJob, layer: nn.Module, spec: BitSpec, config: OSPlusConfig) -> dict[str, dict]:
    """Search and fold the three sites of ``layer`` in the official order; its linears stay FP nn.Linears."""
    a = job.adapter
    heads, _, head_dim = job.attention_geometry()
    samples = min(config.search_samples, len(job.q_inputs))
    stats: dict[str, dict] = {}

    def site(pair: ScalePair, x: torch.Tensor, fn: SiteFn, scratch: int = 0) -> None:
        linears = [layer.get_submodule(name) for name in pair.consumers]
        biases = [None if lin.bias is None else lin.bias.float() for lin in linears]
        shift = None
        if config.shift and pair != a.mlp_out:  # the SwiGLU product in front of down_proj cannot absorb a shift
            shift = (x.amax(dim=(0, 1)) + x.amin(dim=(0, 1))) / 2
            x = x - shift
            biases = [(0 if b is None else b) + lin.weight.float() @ shift for b, lin in zip(biases, linears)]
        result = search_threshold(x, [lin.weight.float() for lin in linears], biases, fn, spec, config, scratch)
        migrate(layer, pair, result.scales, shift, a)
        stats[pair.name] = {"threshold": result.threshold, "candidates": result.candidates, "loss": result.loss,
                            "loss_unscaled": result.loss_unscaled, "scaled_channels": int((result.scales > 1).sum()),
                            "max_scale": result.scales.max().item()}

    seqlen, width = job.q_inputs.shape[1], layer.get_submodule(a.mlp_in.consumers[-1]).out_features
    x = site_input(job, layer, a.attn_in.consumers[0], samples)
    site(a.attn_in, x, attention_site(a, layer, job.position_embeddings),
         scratch=samples * heads * seqlen * (seqlen + 4 * head_dim))  # attention scores, rotated and repeated Q/K/V
    with rtn_quantized(layer, spec, job, (*a.attn_in.consumers, *a.attn_out.consumers)):
        x = site_input(job, layer, a.mlp_in.consumers[0], samples)
        site(a.mlp_in, x, gated_site(a.mlp_activation(layer)), scratch=2 * samples * seqlen * width)
        with rtn_quantized(layer, spec, job, a.mlp_in.consumers):
            x = site_input(job, layer, a.mlp_out.consumers[0], samples)
    site(a.mlp_out, x, linear_site)
    return stats


@torch.no_grad()
def suppress(model: nn.Module, calibration: torch.Tensor, spec: BitSpec, config: OSPlusConfig, context: QuantContext,
             solver: SolverOptions | None = SolverOptions()) -> dict:
    """Migrate every block in place and round it with ``solver`` (None: leave the migrated weights FP); return per-block stats."""
    def solve(job: BlockJob) -> dict:
        (layer,) = job.layers
        sites = suppress_block(job, layer, spec, config)
        if solver is not None:  # the job's inputs are the student's: what the migrated, quantized model so far feeds
            solve_block(job, layer, spec, solver)
        return {"sites": sites}

    return {"jobs": run_blockwise(model, calibration, BlockHooks(solve=solve), device=context.device, desc="os+",
                                  progress=context.progress)}


@register_method
class OSPlus(Method):
    name = "os+"
    description = "OS+: per-channel scaling of activation outliers down to a threshold searched on the quantized site output"
    config_class = OSPlusConfig

    def check(self, spec: BitSpec) -> None:
        if not (spec.quantizes_weights and spec.quantizes_activations):
            raise ConfigError(f"bits: {spec.name} is not allowed for os+: it searches scales against weight and activation "
                              "quantization, as every official config; use a spec that quantizes both (e.g. W8A8, W6A6, W4A4)")

    def check_model(self, config: PretrainedConfig) -> None:
        """The gate/up and down_proj sites are a dense gated MLP's (``adapter.refusal("mlp_site")``: not a MoE's)."""
        adapter = get_adapter(config)
        if (why := adapter.refusal("mlp_site")) is not None:
            raise ConfigError(f"model: os+ cannot run on {adapter.family}: {why} for its threshold search to score")

    def working_memory(self, config: PretrainedConfig) -> WorkingMemory:
        """One batch of threshold candidates, and the site inputs of ``search_samples`` windows."""
        return WorkingMemory(extra_bytes=self.config.batch_mb * 2**20, samples=self.config.search_samples)

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        calibration = self.require_calibration(calibration)
        adapter = get_adapter(model)
        if self.config.shift:  # refuse before any work what migrate() would refuse at the first block
            for pair in (adapter.attn_in, adapter.mlp_in):
                refuse_unshiftable(pair, adapter.layers(model)[0].get_submodule(pair.producer))
        stats = suppress(model, calibration, spec, self.config, context, SolverOptions(self.config.weight_solver))
        for name in (adapter.attn_in.name, adapter.mlp_in.name, adapter.mlp_out.name):
            sites = [job["sites"][name] for job in stats["jobs"]]
            log.info("os+ %s: %d of %d blocks scaled, site error (mean over blocks) %.4g -> %.4g", name,
                     sum(s["scaled_channels"] > 0 for s in sites), len(sites),
                     statistics.fmean(s["loss_unscaled"] for s in sites), statistics.fmean(s["loss"] for s in sites))
        return QuantizeResult(model, stats)
