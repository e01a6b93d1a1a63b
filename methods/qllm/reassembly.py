"""QLLM adaptive channel reassembly: disassemble outlier channels, assemble similar ones, pick theta.

Numerics follow the official code (ModelTC/QLLM: ``disassembly/cd_module.py``,
``assembly/ca_module.py``, ``reassembly/cr_module.py``, ``models/int_qllm_llama_layer.py``):

- statistic per input channel: max(|min|, |max|) over all calibration tokens of the FP pass;
- disassembly with threshold theta: channel i becomes T_i = max(1, ceil(x_max_i / theta))
  sub-channels x_i / T_i (repeat_interleave, so sub-channels are adjacent); the weight column is
  repeated T_i times. Exact in FP;
- assembly (ToMe bipartite soft matching on the *disassembled* channels: even positions are one
  side, odd positions the other): score(a, b) = ((sum_k W[k,a] + sum_k W[k,b]) * ||x_a - x_b||_2)^2
  with W the consumers' weights stacked along the output dimension and the distance over tokens;
  the r = (added channels) lowest-scoring edges are merged (activation: mean, weight columns: sum);
  sub-channels made by disassembly are masked out of the matching, so the width is back to C;
- theta: official grid downward from max(x_max), step (max - min) / max(100, int(max / 0.5)), a
  candidate evaluated only when the number of added channels changes, stop once added channels
  exceed ``channel_ratio * C``; the theta with the lowest output MSE of the quantized site wins.

Where this differs from the official code, on purpose (the first two are options of the method,
``search_order`` and ``noop_candidate``, whose other values are the official behaviour):
- the official search scores "assemble, then disassemble" (:func:`assemble_first_plan`) as a cheap
  proxy but applies "disassemble, then assemble" (:func:`make_plan`); here by default every
  candidate is scored with exactly the transform that is applied, so the recorded error is the
  error of the applied transform;
- the no-op theta (nothing split) is always a candidate (the official code only keeps it through a
  100000 loss cap), so the search can never make a site worse on the calibration features;
- the score uses the intended formula for odd widths (the official loop leaves the last row zero).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness import BitSpec, LlamaAdapter, quantize_activation, quantize_weight
from harness.quant.reassembly import Reassembled, Reassembly  # noqa: F401  (re-exported: the inference modules live in harness so exports reload without methods)


@dataclass(frozen=True)
class Plan:
    """One reassembly of a width-C input: x' = scatter_mean(x[src] * scale -> group) (see :class:`Reassembly`)."""

    src: torch.Tensor  # (E,) original channel of every expanded channel
    scale: torch.Tensor  # (E,) 1 / T of that channel
    group: torch.Tensor  # (E,) output channel each expanded channel lands in
    count: torch.Tensor  # (C',) number of expanded channels averaged into each output channel
    theta: float
    disassembled: int  # channels split (T > 1)
    added: int  # channels added by disassembly (E - C)
    merged: int  # pairs merged by assembly

    @property
    def width(self) -> int:
        return int(self.count.numel())

    def module(self) -> Reassembly:
        """The inference module applying this plan to an activation."""
        return Reassembly(self.src, self.scale, self.group, self.count)

    def apply_weight(self, w: torch.Tensor) -> torch.Tensor:
        """(out, C) -> (out, C'): repeated columns for sub-channels, summed columns for merged ones."""
        expanded = w.index_select(1, self.src)
        if self.merged == 0:
            return expanded
        return w.new_zeros(w.shape[0], self.width).index_add_(1, self.group, expanded)


def split_counts(x_max: torch.Tensor, theta: float) -> torch.Tensor:
    """T = max(1, ceil(x_max / theta)) as integers."""
    return torch.ceil(x_max / theta).clamp(min=1).long()


def channel_distances(x: torch.Tensor, rows_per_chunk: int = 512) -> torch.Tensor:
    """(C, C) L2 distances between the channels of ``x`` (tokens, C), over tokens.

    Computed once per site: an unsplit expanded channel is its original channel, and sub-channels
    never take part in matching, so every candidate theta only re-indexes this matrix.

    The values are those of the direct float64 computation (``cdist`` without the matrix-product
    shortcut) rounded to float32, bit for bit, which near-identical channels need: the shortcut
    |a|^2 + |b|^2 - 2 a.b cancels exactly there (the official code uses it in float32). But the
    direct loop is 4-5x slower than a matrix product and was a tenth of QLLM's time, so the
    distances come from the product in float64, with a rigorous bound on its error, and the few
    entries whose float32 rounding that bound leaves open (almost only near-identical channels:
    about 20 of 2.4M on smollm2's down_proj inputs) are computed directly. Rows go in chunks, so the
    float64 temporaries stay small beside the (C, C) float32 result (C is the MLP width at down_proj).
    """
    xt = x.t().double()
    C, k = xt.shape
    eps = torch.finfo(torch.float64).eps
    norms = (xt * xt).sum(1)
    out = torch.empty(C, C, dtype=torch.float32, device=x.device)
    for start in range(0, C, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, C))
        total = norms[rows, None] + norms[None, :]
        d = (total - 2.0 * (xt[rows] @ xt.t())).clamp_min_(0.0).sqrt_()
        f = d.float()
        # |fl(d^2) - d^2| <= (2k + 3) eps (|a|^2 + |b|^2) for k-term dot products (2x margin below), so
        # |error of d| <= that / d; plus the direct loop's own error on d, (k + 2) eps d, so that the
        # result is the direct loop's and not merely the exact value's rounding
        err = total.mul_(4.0 * (k + 4) * eps).div_(d).add_(d * ((k + 2) * eps))
        # f is certain when [d - err, d + err] lies inside f's float32 rounding interval: half an ulp
        # either side, but only a quarter below a power of two (the ulp below it is half as wide)
        mantissa, exponent = torch.frexp(f)
        half_ulp = torch.ldexp(torch.ones_like(d), exponent.to(torch.int64) - 25)
        half_ulp = torch.where((mantissa == 0.5) & (d < f.double()), half_ulp / 2, half_ulp)
        unsure = (d - f.double()).abs_().add_(err) >= half_ulp
        unsure |= d == 0  # identical (or all-zero) channels: err is inf or NaN there
        i, j = unsure.nonzero(as_tuple=True)
        if i.numel():
            pairs = torch.cdist(xt[rows][i][:, None], xt[j][:, None], compute_mode="donot_use_mm_for_euclid_dist")
            f[i, j] = pairs.flatten().float()
        out[rows] = f
    return out


def match_channels(dist: torch.Tensor, wsum: torch.Tensor, src: torch.Tensor, frozen: torch.Tensor, r: int
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Bipartite soft matching; return (src, dst) expanded-channel positions of ``r`` merges.

    ``dist`` (C, C) channel distances, ``wsum`` (C,) column sums of the stacked consumer weights,
    ``src`` (E,) original channel of each expanded channel, ``frozen`` (E,) channels that must not
    be merged. None when fewer than ``r`` mergeable pairs exist.
    """
    sa, sb = src[::2], src[1::2]
    scores = ((wsum[sa, None] + wsum[None, sb]) * dist[sa][:, sb]).pow(2)
    scores[frozen[::2], :] = math.inf
    scores[:, frozen[1::2]] = math.inf
    best, best_b = scores.min(dim=-1)
    order = best.argsort(stable=True)[:r]
    if r > 0 and not torch.isfinite(best[order]).all():
        return None
    return order * 2, best_b[order] * 2 + 1


def make_plan(x_max: torch.Tensor, theta: float, x: torch.Tensor | None, w: torch.Tensor | None, assemble: bool,
              dist: torch.Tensor | None = None) -> Plan | None:
    """The reassembly for ``theta``; ``x`` (tokens, C) and ``w`` (out, C) are needed to assemble.

    ``dist`` = ``channel_distances(x)`` when the caller has it. None when assembly cannot find
    enough mergeable pairs.
    """
    counts = split_counts(x_max, theta)
    C = x_max.numel()
    src = torch.repeat_interleave(torch.arange(C, device=x_max.device), counts)
    scale = (1.0 / counts.float()).repeat_interleave(counts)
    E = src.numel()
    added, disassembled = E - C, int((counts > 1).sum())
    group, count, merged = torch.arange(E, device=src.device), torch.ones(E, device=src.device), 0
    if assemble and added > 0:
        dist = channel_distances(x) if dist is None else dist
        matched = match_channels(dist, w.sum(0), src, scale < 1, added)
        if matched is None:
            return None
        s_pos, d_pos = matched
        keep = torch.ones(E, dtype=torch.bool, device=src.device)
        keep[s_pos] = False
        rank = torch.cumsum(keep.long(), 0) - 1  # output index of every kept channel, in order
        group = rank.clone()
        group[s_pos] = rank[d_pos]
        count = torch.zeros(C, device=src.device).index_add_(0, group, torch.ones(E, device=src.device))
        merged = added
    return Plan(src, scale, group, count, float(theta), disassembled, added, merged)


def assemble_first_plan(x_max: torch.Tensor, theta: float, x: torch.Tensor, w: torch.Tensor,
                        dist: torch.Tensor | None = None) -> Plan | None:
    """The transform the official search scores for ``theta``: assemble, then disassemble.

    ModelTC/QLLM 653a329e reassembly/cr_module.py L176-226: the matching runs once on the *original*
    channels (even ones against odd ones, outlier channels masked out, the same score as
    :func:`match_channels`), the ``added`` best pairs are averaged (weight columns summed) and the
    merged even channels dropped, then every outlier channel is split into T sub-channels x / T
    (weight columns repeated). Width C again. It is not what the official code applies
    for the chosen theta (:func:`make_plan`: disassemble first, then match on the expanded channels).
    None when fewer than ``added`` mergeable pairs exist, which cannot happen with channel_ratio <= 1/4
    (at most ``added`` outliers, so at least C/2 - added unmasked even channels).
    """
    counts = split_counts(x_max, theta)
    C = x_max.numel()
    channels = torch.arange(C, device=x_max.device)
    added = int(counts.sum()) - C
    if added == 0:
        return make_plan(x_max, theta, None, None, assemble=False)
    dist = channel_distances(x) if dist is None else dist
    matched = match_channels(dist, w.sum(0), channels, counts > 1, added)
    if matched is None:
        return None
    s_pos, d_pos = matched  # original channels: s_pos is averaged into d_pos (neither is an outlier)
    merged_away = torch.zeros(C, dtype=torch.bool, device=counts.device)
    merged_away[s_pos] = True
    kept_width = counts.masked_fill(merged_away, 0)
    first_out = torch.cumsum(kept_width, 0) - kept_width  # output channel of each kept channel's first part
    src = torch.repeat_interleave(channels, counts)
    scale = (1.0 / counts.float()).repeat_interleave(counts)
    part = torch.arange(src.numel(), device=src.device) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    lands_in = channels.clone()
    lands_in[s_pos] = d_pos
    group = first_out[lands_in[src]] + part
    count = torch.zeros(C, device=src.device).index_add_(0, group, torch.ones(src.numel(), device=src.device))
    return Plan(src, scale, group, count, float(theta), int((counts > 1).sum()), added, added)


def theta_grid(x_max: torch.Tensor, channel_ratio: float, steps: int = 0) -> list[float]:
    """Official candidate thresholds: downward from the max, one per change in added channels.

    The first element is the no-op theta (the max statistic). ``steps`` = 0 uses the official
    step count max(100, int(max / 0.5)).
    """
    hi, lo = float(x_max.max()), float(x_max.min())
    n = steps or max(100, int(hi / 0.5))
    step = (hi - lo) / n
    limit = int(x_max.numel() * channel_ratio)
    grid, prev, th, C = [hi], 0, hi, x_max.numel()
    for _ in range(n):
        if th < lo or step <= 0:
            break
        added = int(split_counts(x_max, th).sum()) - C
        if added > limit:
            break
        if added != prev:
            grid.append(th)
            prev = added
        th -= step
    return grid


def ratio_theta(x_max: torch.Tensor, channel_ratio: float, steps: int = 0) -> float:
    """Non-adaptive theta of the official CD module: the lowest grid point within the channel budget."""
    return theta_grid(x_max, channel_ratio, steps)[-1]


# --- the functions whose output error a reassembly is judged by ------------------------------


SiteFn = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


def attention_fn(layer: nn.Module, adapter: LlamaAdapter, position_embeddings: Any) -> SiteFn:
    """q/k/v site: the attention output before o_proj (the block's real attention module with o_proj the identity:
    its Q/K norms, RoPE, GQA, scaling, and the layer's RoPE and mask from the adapter)."""
    path = adapter.attention_path
    attn = layer.get_submodule(path)
    names = [name[len(path) + 1:] for name in adapter.qkv_names]
    out_name = adapter.attn_out.consumers[0][len(path) + 1:]
    o_proj = attn.get_submodule(out_name)

    def fn(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        params = {f"{n}.weight": w for n, w in zip(names, weights)}
        params[f"{out_name}.weight"] = torch.eye(o_proj.in_features, device=x.device, dtype=x.dtype)
        if o_proj.bias is not None:
            params[f"{out_name}.bias"] = torch.zeros(o_proj.in_features, device=x.device, dtype=x.dtype)
        out = torch.func.functional_call(attn, params, (x,), adapter.attention_inputs(layer, x, position_embeddings))
        return out[0] if isinstance(out, tuple) else out

    return fn


def gated_fn(act: Callable, biases: Sequence[torch.Tensor | None]) -> SiteFn:
    """gate/up site: act(gate(x)) * up(x)."""
    def fn(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        return act(F.linear(x, weights[0], biases[0])) * F.linear(x, weights[1], biases[1])

    return fn


def linear_fn(bias: torch.Tensor | None) -> SiteFn:
    """down_proj site: its output."""
    return lambda x, weights: F.linear(x, weights[0], bias)


def site_error(fn: SiteFn, x: torch.Tensor, weights: Sequence[torch.Tensor], reference: torch.Tensor,
               plan: Plan | None, spec: BitSpec) -> float:
    """MSE between the FP output and the output with reassembled, quantized input and weights."""
    if plan is not None:
        x, weights = plan.module()(x), [plan.apply_weight(w) for w in weights]
    xq = quantize_activation(x, spec.a_bits, spec.a_symmetric)
    wq = [quantize_weight(w, spec) for w in weights]
    return F.mse_loss(fn(xq, wq), reference).item()


# The official search's starting "best loss": the no-op theta wins only if no candidate scores below
# it (ModelTC/QLLM 653a329e reassembly/cr_module.py L170-171, L238-241).
OFFICIAL_LOSS_CAP = 100000.0


@dataclass(frozen=True)
class SearchResult:
    plan: Plan | None  # None: leave the site as it is
    error_before: float
    error_after: float  # the site error of ``plan`` (of leaving the site alone when None)
    candidates: int
    error_scored: float | None = None  # order="official": the winning candidate's proxy score


@torch.no_grad()
def search(fn: SiteFn, x: torch.Tensor, x_max: torch.Tensor, weights: Sequence[torch.Tensor], spec: BitSpec, *,
           thetas: Sequence[float], assemble: bool, order: str = "applied", noop: bool = True) -> SearchResult:
    """Evaluate every theta in ``thetas`` and keep the one with the lowest site error.

    ``x`` (samples, seqlen, C) FP features of the site. ``order="applied"``: each candidate is scored
    with the plan that is applied; ``"official"``: scored with :func:`assemble_first_plan`, and the
    winning theta's :func:`make_plan` is applied (its own error is ``error_after``). ``noop=True``:
    the no-op (nothing split) is a candidate and wins ties, so the scored error is never worse than
    leaving the site alone; ``False``: the official cap instead (:data:`OFFICIAL_LOSS_CAP`).
    The first of equal scores wins (the highest theta), as in the official loop.
    """
    reference = fn(x, weights)
    before = site_error(fn, x, weights, reference, None, spec)
    tokens = x.reshape(-1, x.shape[-1])
    stacked = torch.cat(list(weights), 0)
    dist = channel_distances(tokens) if assemble and thetas else None
    best, best_err, evaluated = None, before if noop else OFFICIAL_LOSS_CAP, 0
    for theta in thetas:
        if order == "official" and assemble:
            plan = assemble_first_plan(x_max, theta, tokens, stacked, dist)
        else:
            plan = make_plan(x_max, theta, tokens, stacked, assemble, dist)
        if plan is None or plan.added == 0:
            continue
        evaluated += 1
        err = site_error(fn, x, weights, reference, plan, spec)
        if err < best_err:
            best, best_err = plan, err
    if best is None:
        return SearchResult(None, before, before, evaluated)
    if order != "official" or not assemble:  # without assembly both orders are the same plan
        return SearchResult(best, before, best_err, evaluated)
    # what the official code applies for the chosen theta (models/int_qllm_llama_layer.py L211-229)
    applied = make_plan(x_max, best.theta, tokens, stacked, assemble, dist)
    after = site_error(fn, x, weights, reference, applied, spec) if applied is not None else before
    return SearchResult(applied, before, after, evaluated, error_scored=best_err)
