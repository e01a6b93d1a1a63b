"""The QLLM method (Liu et al., arXiv 2310.08041): adaptive channel reassembly + efficient error correction.

Per group of decoder blocks (the shared block-wise engine, ``harness.engine.blockwise``):

1. the engine's teacher pass (FP blocks on FP inputs) records, at the inputs of q/k/v (after
   input_layernorm), gate/up (after post_attention_layernorm) and down_proj, the per-channel
   outlier statistic max|X| and the features of the first ``search_samples`` calibration samples;
2. channel reassembly (``reassembly.py``) picks theta per site and rewrites the consumers' weights;
   a small index/scale module applies the same rewrite to the activation at inference;
3. error correction (``correction.py``) trains low-rank corrections of every quantized linear
   (and the RMSNorm weights), then merges them into the weights before they are frozen;
4. after the last block the final RMSNorm (weight + bias) is tuned on the last block's outputs.

Run:  python -m harness.cli run configs/ablation-qllm.yaml   (see README, section QLLM)
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
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
    freeze,
    get_adapter,
    quant_linears,
    quantize_block,
    quantizers_disabled,
    register_method,
)
from harness.engine.blockwise import run_blockwise, train
from harness.engine.hooks import BlockHooks, BlockJob
from harness.method import WorkingMemory, keyed_when_set, option
from harness.models.lazy import block_store
from harness.quant.quantizer import set_zero_point_grad
from harness.runtime import release_freed_memory
from methods.qllm.correction import NormWithBias, add_lowrank, fold_bias_into_head, merge_lowrank, weights_offloaded
from methods.qllm.reassembly import (
    Plan,
    Reassembled,
    SiteFn,
    attention_fn,
    gated_fn,
    linear_fn,
    make_plan,
    ratio_theta,
    search,
    site_error,
    theta_grid,
)

log = logging.getLogger(__name__)

SITES = ("attn_in", "mlp_in", "mlp_out")  # q/k/v input, gate/up input, down_proj input (not o_proj)


def site_input(site: str, adapter: LlamaAdapter) -> str:
    """The linear whose input is the site's input (q/k/v and gate/up share one; the first stands for them)."""
    return getattr(adapter, site).consumers[0]


@dataclass(frozen=True)
class QLLMConfig(MethodConfig):
    """QLLM's options, each with its one-line meaning; the longer notes:

    theta: "ratio" is the lowest grid theta that adds at most ``channel_ratio * width`` channels (the
        official non-adaptive CD).
    search_order: "applied" scores each theta candidate with the transform that is applied,
        disassemble then assemble; "official" scores with the official proxy, assemble then
        disassemble (ModelTC/QLLM 653a329e reassembly/cr_module.py L179-236), while the chosen theta
        is applied disassemble then assemble as the official code does (models/int_qllm_llama_layer.py
        L211-229). The sites' ``error_after`` is then the applied plan's error, ``error_scored`` the
        proxy's. No difference with assembly: false.
    noop_candidate: false is the official search, which starts from min_loss = 100000 and best_th =
        max (the no-op, never scored) and keeps the no-op only when every candidate scores >= 100000
        (reassembly/cr_module.py L170-171, L238-241; theta="adaptive" only).
    shuffle: the official loop draws torch.randperm from the global generator (quantize/qllm.py L388,
        and L733 for the final norm).
    zero_point_grad: "none" is plain round() without a gradient, as the official quantizer
        (quantize/quantizer.py L152-153). The same values, and in practice the same training: the
        zero point's gradient is non-zero only through values that fall off the grid, which per-token
        ranges without clipping do not produce (Q(W) is cached).
    low_memory: the job's frozen Q(W) is kept as integer codes (1 byte per weight instead of 4) and
        dequantized in each forward and again in the backward (``correction.CachedWeight``), and W
        itself stays out of memory until the merge (``correction.weights_offloaded``: host memory for
        a GPU job, the run's work directory for a CPU one). The same results bit for bit (tested);
        while the corrections train, the job holds a quarter of its float32 weights instead of twice
        them, for two more elementwise passes per weight and step (about 8% more time on CPU) and one
        write and read of W per job.
    """

    disassembly: bool = option(True, "split outlier input channels into sub-channels (channel disassembly, CD)")
    assembly: bool = option(True, "merge as many similar channel pairs as disassembly added (channel assembly, CA); needs disassembly")
    theta: Literal["adaptive", "ratio", "fixed"] = option(
        "adaptive", "how each site's outlier threshold is chosen: per-site grid search on the reassembly error (official), "
        "a channel budget, or theta_value")
    theta_value: float | None = option(None, "the threshold for theta: fixed")
    channel_ratio: float = option(0.2, "most channels disassembly may add, as a fraction of the width (official scripts: 0.2)")
    grid_steps: int = option(0, "theta grid resolution; 0 = official max(100, int(max|x| / 0.5))")
    search_samples: int = option(1, "calibration samples whose features score theta and the channel matching (official: 1)")
    error_correction: bool = option(True, "train low-rank corrections W + s B A against the FP block outputs (EC)")
    rank: int = option(4, "rank r of the corrections (official 4)")
    alpha: float = option(1.0, "scaling numerator of the corrections, s = alpha / rank (official 1)")
    blocks_per_job: int = option(4, "decoder blocks trained jointly (official scripts: 4)")
    epochs: int = option(10, "passes over the calibration samples per job (official 10)")
    lr: float = option(5e-4, "AdamW learning rate, decayed linearly to 0 per job (official 5e-4)")
    batch_size: int = option(1, "calibration samples per optimizer step (official 1)")
    train_norms: bool = option(True, "also train the blocks' RMSNorm weights (official: yes)")
    final_norm: Literal["weight_bias", "weight", "off"] = option(
        "weight_bias", "tune the final RMSNorm after the last block: weight and a head bias (official), weight only, or not")
    # added after runs were keyed: at their defaults they stay out of run keys (harness.method)
    search_order: Literal["applied", "official"] = keyed_when_set(
        "applied", "the transform each theta candidate is scored with: the applied one, or the official proxy (notes above)")
    noop_candidate: bool = keyed_when_set(True, "leaving a site alone is a theta candidate and wins ties (false: the official search)")
    shuffle: bool = keyed_when_set(True, "a new sample order per epoch, seeded by the run's seed (official); false = in order")
    zero_point_grad: Literal["ste", "none"] = keyed_when_set(
        "ste", "activation zero points round with a straight-through estimator while training; none = the official plain round")
    low_memory: bool = keyed_when_set(False, "Q(W) as 1-byte codes and W out of memory while training: same results, less memory")
    weight_solver: str = keyed_when_set("rtn", "rtn only: its low-rank corrections are trained against its own rounded weights")

    def __post_init__(self) -> None:
        if self.weight_solver != "rtn":
            raise ConfigError(f"weight_solver: {self.weight_solver!r} is not allowed for qllm: its low-rank corrections are trained against its own rounded weights; use rtn")
        for name, default in (("search_order", "applied"), ("noop_candidate", True)):
            if self.theta != "adaptive" and getattr(self, name) != default:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is only allowed with theta: adaptive (it changes the search)")
        if self.assembly and not self.disassembly:
            raise ConfigError("assembly: true needs disassembly: true (assembly only removes the channels disassembly adds)")
        if self.theta == "fixed" and (self.theta_value is None or self.theta_value <= 0):
            raise ConfigError(f"theta_value: {self.theta_value!r} is not allowed with theta: fixed; use a positive number")
        if self.theta != "fixed" and self.theta_value is not None:
            raise ConfigError("theta_value: only allowed with theta: fixed")
        if not 0 < self.channel_ratio <= 1:
            raise ConfigError(f"channel_ratio: {self.channel_ratio!r} is not allowed; use a number in (0, 1]")
        for name in ("search_samples", "rank", "blocks_per_job", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not allowed; use a positive integer")
        for name in ("grid_steps", "epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not allowed; use an integer >= 0")
        if self.lr <= 0 or self.alpha <= 0:
            raise ConfigError(f"lr/alpha: {self.lr!r}/{self.alpha!r} is not allowed; use positive numbers")


# --- block surgery -------------------------------------------------------------------------------


def site_function(layer: nn.Module, site: str, position_embeddings, adapter: LlamaAdapter = LlamaAdapter()) -> tuple[tuple[str, ...], SiteFn]:
    """The consumer linears of ``site`` and the function of their outputs QLLM scores theta by."""
    consumers = getattr(adapter, site).consumers
    linears = [layer.get_submodule(c) for c in consumers]
    if site == "attn_in":
        fn = attention_fn(layer, adapter, position_embeddings)
    elif site == "mlp_in":
        fn = gated_fn(adapter.mlp_activation(layer), [lin.bias for lin in linears])
    else:
        fn = linear_fn(linears[0].bias)
    return consumers, fn


def apply_plan(layer: nn.Module, site: str, plan: Plan, adapter: LlamaAdapter = LlamaAdapter()) -> None:
    """Rewrite the site's consumer weights and insert the matching activation rewrite (exact in FP)."""
    pair = getattr(adapter, site)
    for path in pair.consumers:
        linear = layer.get_submodule(path)
        linear.weight.data = plan.apply_weight(linear.weight.data)
        linear.in_features = linear.weight.shape[1]
    reassembly = plan.module().to(plan.src.device)
    if site == "mlp_out":  # the input of down_proj is a product, not a norm output: rewrite it in front
        target, after = pair.consumers[0], False
    else:
        target, after = pair.producer, True
    parent_path, _, attr = target.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    setattr(parent, attr, Reassembled(getattr(parent, attr), reassembly, after))


def reassemble_site(layer: nn.Module, site: str, x_max: torch.Tensor, feats: torch.Tensor, spec: BitSpec,
                    config: QLLMConfig, position_embeddings, adapter: LlamaAdapter = LlamaAdapter()) -> dict:
    """Choose and apply the site's reassembly; return what was done (for the run's stats)."""
    consumers, fn = site_function(layer, site, position_embeddings, adapter)
    weights = [layer.get_submodule(c).weight.detach() for c in consumers]
    tokens = feats.reshape(-1, feats.shape[-1])
    with quantizers_disabled(layer):
        if config.theta == "adaptive":
            result = search(fn, feats, x_max, weights, spec, thetas=theta_grid(x_max, config.channel_ratio, config.grid_steps)[1:],
                            assemble=config.assembly, order=config.search_order, noop=config.noop_candidate)
            plan, before, after, candidates = result.plan, result.error_before, result.error_after, result.candidates
            scored = result.error_scored
        else:
            theta = config.theta_value if config.theta == "fixed" else ratio_theta(x_max, config.channel_ratio, config.grid_steps)
            plan = make_plan(x_max, theta, tokens, torch.cat(weights), config.assembly)
            reference = fn(feats, weights)
            before = site_error(fn, feats, weights, reference, None, spec)
            after = site_error(fn, feats, weights, reference, plan, spec) if plan is not None else before
            candidates, scored = 1, None
    if plan is not None and plan.added > 0:
        apply_plan(layer, site, plan, adapter)
    return {"site": site, "max_stat": float(x_max.max()), "theta": plan.theta if plan else float(x_max.max()),
            "disassembled": plan.disassembled if plan else 0, "added": plan.added if plan else 0,
            "merged": plan.merged if plan else 0, "error_before": before, "error_after": after, "candidates": candidates,
            **({"error_scored": scored} if scored is not None else {})}


# --- the method ------------------------------------------------------------------------------------


class QLLMHooks(BlockHooks):
    """QLLM's work per group of ``blocks_per_job`` blocks: the teacher pass records each site's input
    (max|X| and ``search_samples`` windows); ``solve`` reassembles the sites and trains the corrections;
    ``after`` keeps the last block's quantized and FP outputs (``state``, checkpointed) for the final norm."""

    def __init__(self, cfg: QLLMConfig, spec: BitSpec, context: QuantContext, adapter: LlamaAdapter, blocks: int,
                 scratch: Path | None) -> None:
        record = tuple(site_input(site, adapter) for site in SITES) if cfg.disassembly else ()
        super().__init__(record=record, keep_samples=cfg.search_samples, blocks_per_job=cfg.blocks_per_job)
        self.cfg, self.spec, self.context, self.adapter = cfg, spec, context, adapter
        self.last_block = blocks - 1
        self.scratch = scratch  # the run's work directory, on its disk (where low_memory keeps W)

    def solve(self, job: BlockJob) -> dict:
        cfg, adapter = self.cfg, self.adapter
        sites, started = [], time.time()
        for layer in job.layers:
            quantize_block(layer, self.spec, adapter)
        if cfg.disassembly:
            for offset, layer in enumerate(job.layers):
                recorded = job.inputs[offset]  # the FP pass, before quantizing
                for site in SITES:
                    name = site_input(site, adapter)
                    x_max, feats = recorded.abs_max[name], recorded.first_samples(name)
                    stats = reassemble_site(layer, site, x_max, feats, self.spec, cfg, job.position_embeddings, adapter)
                    sites.append({"layer": job.index + offset, **stats})
        losses = correct_errors(job, cfg, self.context, self.scratch) if cfg.error_correction else []
        for layer in job.layers:
            freeze(layer)
        added = sum(s["added"] for s in sites)
        log.info("%s: %d sites reassembled (+%d channels), loss %s, %.1fs", job.label,
                 sum(1 for s in sites if s["added"]), added, f"{losses[-1]:.4g}" if losses else "-", time.time() - started)
        out: dict = {"sites": sites}
        if losses:
            out.update(loss_first=losses[0], loss=losses[-1])
        return out

    def after(self, job: BlockJob) -> None:
        """After the last block: its quantized outputs (the student pass's) and the FP targets, for the final norm."""
        if self.cfg.final_norm != "off" and job.index + len(job.layers) - 1 == self.last_block:
            self.state["q"] = job.q_inputs.to("cpu", torch.float32, copy=True)
            self.state["fp"] = job.targets.float().cpu()




@register_method
class QLLM(Method):
    name = "qllm"
    description = "QLLM: adaptive channel reassembly + low-rank error correction (Liu et al. 2023)"
    config_class = QLLMConfig

    def check_model(self, config: PretrainedConfig) -> None:
        """Channel reassembly's gate/up and down_proj sites are a dense gated MLP's (``adapter.refusal("mlp_site")``)."""
        adapter = get_adapter(config)
        if self.config.disassembly and (why := adapter.refusal("mlp_site")) is not None:
            raise ConfigError(f"model: qllm's channel reassembly cannot run on {adapter.family}: {why} to reassemble; "
                              "use disassembly: false and assembly: false (the low-rank error correction alone)")

    def working_memory(self, config: PretrainedConfig) -> WorkingMemory:
        """Q(W) of the block group, cached while the error correction trains (low_memory: as 1-byte codes), and
        the site features of ``search_samples`` windows."""
        cfg = self.config
        return WorkingMemory(blocks_per_job=cfg.blocks_per_job, weight_copies=0.25 if cfg.low_memory else 1.0,
                             samples=cfg.search_samples)

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        calibration = self.require_calibration(calibration)
        adapter, store = get_adapter(model), block_store(model)
        hooks = QLLMHooks(self.config, spec, context, adapter, len(adapter.layers(model)),
                          scratch=store.work if store is not None else None)
        jobs = run_blockwise(model, calibration, hooks, device=context.device, desc="qllm", progress=context.progress)
        stats: dict = {"jobs": jobs, "quantized_linears": sum(1 for _ in quant_linears(model))}
        final = hooks.state
        if final:
            stats["final_norm_loss"] = tune_final_norm(model, final["q"], final["fp"], self.config, context)
        sites = [s for j in jobs for s in j["sites"]]
        if sites:
            stats["reassembled_sites"] = sum(1 for s in sites if s["added"] > 0)
            stats["added_channels"] = sum(s["added"] for s in sites)
        return QuantizeResult(model, stats)


def correct_errors(job: BlockJob, cfg: QLLMConfig, context: QuantContext, scratch: Path | None = None) -> list[float]:
    """Train low-rank corrections (+ norm weights) of the job's blocks, then merge them; return epoch losses.

    ``scratch``: where ``low_memory`` keeps the frozen weights while the corrections train."""
    generator = torch.Generator().manual_seed(context.seed * 1000 + job.index)
    params: list[nn.Parameter] = []
    linears = []
    for layer in job.layers:
        for p in layer.parameters():
            p.requires_grad_(False)
        if cfg.zero_point_grad == "none":
            set_zero_point_grad(layer, False)  # the linears' inputs and Q/K/V (Q(W) is cached, no gradient)
        for _, linear in quant_linears(layer):
            lowrank = add_lowrank(linear, cfg.rank, cfg.alpha, generator, cfg.low_memory)
            params += [lowrank.lora_A, lowrank.lora_B]
            linears.append(linear)
        if cfg.train_norms:
            for pair in (job.adapter.attn_in, job.adapter.mlp_in):
                norm = layer.get_submodule(pair.producer)
                norm = norm.module if isinstance(norm, Reassembled) else norm
                norm.weight.requires_grad_(True)
                params.append(norm.weight)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(job.forward(job.rows(job.q_inputs, idx)), job.rows(job.targets, idx))

    # low_memory: W waits outside the process until its merge (training reads only the cached Q(W))
    with weights_offloaded(linears, scratch) if cfg.low_memory else contextlib.nullcontext(lambda linear: None) as restore:
        losses = train([{"params": params, "lr": cfg.lr}], loss_fn, len(job.q_inputs), epochs=cfg.epochs,
                       batch_size=cfg.batch_size, linear_decay=True, seed=context.seed + job.index, shuffle=cfg.shuffle,
                       label=job.label, device=job.device, progress=context.progress)
        for p in params:
            p.requires_grad_(False)
        if cfg.low_memory:
            release_freed_memory()  # the steps' freed buffers, before the weights come back
        for linear in linears:
            restore(linear)
            merge_lowrank(linear)  # drops the linear's codes
    return losses


def tune_final_norm(model: nn.Module, q_out: torch.Tensor, fp_out: torch.Tensor, cfg: QLLMConfig, context: QuantContext) -> float:
    """Fit the final RMSNorm (and a bias folded into lm_head) to map quantized to FP last-block outputs."""
    adapter = get_adapter(model)
    norm, head = adapter.final_norm(model), adapter.lm_head(model)
    device, dtype, home = context.device, norm.weight.dtype, norm.weight.device
    norm.to(device=device, dtype=torch.float32)
    q_out, fp_out = q_out.to(device), fp_out.to(device)
    with torch.no_grad():
        target = torch.cat([norm(fp_out[i : i + 1]) for i in range(len(fp_out))])
    student = NormWithBias(norm) if cfg.final_norm == "weight_bias" else norm
    params = [p for p in student.parameters()]
    for p in params:
        p.requires_grad_(True)
    losses = train([{"params": params, "lr": cfg.lr}], lambda idx: F.mse_loss(student(q_out[idx]), target[idx]),
                   len(q_out), epochs=cfg.epochs, batch_size=cfg.batch_size, linear_decay=True, seed=context.seed,
                   shuffle=cfg.shuffle, label="final norm", device=device, progress=context.progress)
    for p in params:
        p.requires_grad_(False)
    norm.to(device=home, dtype=dtype)
    if isinstance(student, NormWithBias):
        head_device = head.weight.device
        fold_bias_into_head(head, student.bias.detach().to(head_device))
    return losses[-1] if losses else float("nan")
