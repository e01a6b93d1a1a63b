"""FlatQuant (Sun et al., 2024): learnable affine transforms that flatten weights and activations, block by block.

For each decoder block, on the block-wise engine: the FP block's outputs on the FP inputs are the targets
(teacher pass, which also records max |X| of q_proj's, gate_proj's and down_proj's inputs); the block gets
its learnable transforms (``block.py``: a Kronecker-factored P1 ⊗ P2 with a per-channel scale before q/k/v,
gate/up and down_proj, Po ⊗ Pv before o_proj with Pv in v_proj's rows, Pk on Q and K after RoPE when the KV
cache is quantized), learnable weight clipping (LWC) and activation clipping (LAC); all of it trains with
AdamW against the targets (MSE, each step on loss / loss.detach(), cosine schedule, the samples in order in
batches of ``batch_size``, on the FP inputs: the official ``cali_flat_quant``); then the transforms merge
into the weights where the official ``reparameterize`` merges them, the rest stays online
(``KroneckerAffine``), and ``weight_solver`` rounds the merged weights: RTN (the paper's headline) or GPTQ
(official ``--gptq``). Official code: ruikangliu/FlatQuant 9d88ffc (``main.py``, ``flatquant/train_utils.py``,
``flat_utils.py``, ``model_tools/llama_utils.py``).

At W16A16 the transforms are built and trained all the same (nothing is rounded, so the loss is float
noise): the perplexity equals FP's, a check of the algebra on any model (the official code builds none there).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from harness import BitSpec, ConfigError, Method, MethodConfig, QuantContext, QuantizeResult, get_adapter, option, register_method
from harness.engine.blockwise import run_blockwise, train
from harness.engine.hooks import BlockHooks, BlockJob
from harness.engine.solvers import SolverOptions, check_solver, solve_block
from harness.method import WorkingMemory
from harness.quant.gptq import GPTQOptions
from methods.flatquant.block import BlockOptions, FlatBlock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlatQuantConfig(MethodConfig):
    """FlatQuant's options, as the official ``main.py`` arguments of its W4A4KV4 scripts (``scripts/*/w4a4kv4.sh``)."""

    epochs: int = option(15, "training epochs per block (official --epochs 15; 0 = the initial transforms, untrained)")
    batch_size: int = option(4, "calibration windows per step (official --cali_bsz 4); the last short batch is left out")
    lr: float = option(5e-3, "AdamW learning rate of the transforms and scales (official --flat_lr 5e-3 in its scripts; "
                             "argparse default 1e-5)")
    clip_lr: float = option(5e-2, "AdamW learning rate of the clipping factors (official: 10 x --flat_lr)")
    weight_decay: float = option(0.01, "AdamW weight decay of every trained parameter (official: torch's AdamW default)")
    transform: Literal["svd", "inverse"] = option(
        "svd", "each matrix as U diag(s) V^T with Cayley-orthogonal U, V (official default); inverse = the matrix itself, "
               "inverted in float64 (official --direct_inv, its Qwen2.5 scripts)")
    train_transforms: bool = option(True, "learn the matrices (official --cali_trans); false keeps their random orthogonal start")
    diag: bool = option(True, "a learnable per-channel scale before each Kronecker transform (official --add_diag)")
    diag_init: Literal["sq_style", "one_style"] = option(
        "sq_style", "the scale starts at max|W|^(1-alpha) / max|X|^alpha (official sq_style) or at 1 (one_style)")
    diag_alpha: float = option(0.3, "alpha of the sq_style start (official --diag_alpha 0.3)")
    lwc: bool = option(True, "learn each weight row's clipping range (official --lwc)")
    lac: bool = option(True, "learn each activation quantizer's clipping range, K/V included (official --lac)")
    weight_solver: Literal["rtn", "gptq"] = option("rtn", "how the merged weights are rounded (official: RTN; gptq = --gptq)")
    act_order: bool = option(False, "GPTQ rounds columns by decreasing Hessian diagonal (official --act_order)")
    damp: float = option(0.01, "GPTQ dampening, a fraction of the mean Hessian diagonal (official --percdamp)")

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs: {self.epochs} is not allowed; use an integer >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: {self.batch_size} is not allowed; use a positive integer")
        for name in ("lr", "clip_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: {getattr(self, name)} is not allowed; use a positive learning rate")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: {self.weight_decay} is not allowed; use a number >= 0")
        if self.transform not in ("svd", "inverse"):
            raise ConfigError(f"transform: {self.transform!r} is not allowed; use svd or inverse")
        if self.diag_init not in ("sq_style", "one_style"):
            raise ConfigError(f"diag_init: {self.diag_init!r} is not allowed; use sq_style or one_style")
        if not 0.0 <= self.diag_alpha <= 1.0:
            raise ConfigError(f"diag_alpha: {self.diag_alpha} is not allowed; use a number in [0, 1]")
        check_solver(self.weight_solver)
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp: {self.damp} is not allowed; use a number in (0, 1)")


@register_method
class FlatQuant(Method):
    name = "flatquant"
    description = ("FlatQuant: learnable Kronecker-factored affine transforms, weight and activation clipping, "
                   "trained block by block; RTN or GPTQ weights")
    config_class = FlatQuantConfig
    # the official scripts' settings: symmetric weights and activations on the full signed grid (sym_quant), K and
    # V asymmetric per token and head (--k_asym --v_asym, groups of head_dim), Q FP (--q_bits 16), no fixed clip
    quant_defaults = {"weight_symmetric": True, "act_symmetric": True, "symmetric_grid": "full", "kv_symmetric": False,
                      "attention": False}

    def solver_options(self) -> SolverOptions:
        """GPTQ as the official ``gptq_fwrd``: k/v/q, o, up/gate, down one after another, no clip search."""
        c = self.config
        return SolverOptions(c.weight_solver, GPTQOptions(damp=c.damp, act_order=c.act_order, clip_search=False),
                             true_sequential=True)

    def check(self, spec: BitSpec) -> None:
        if spec.attention_scope != "head":
            raise ConfigError("quant.attention_scope: flatquant quantizes Q/K/V per token and head after its K transform; "
                              "use head")
        if self.config.weight_solver == "gptq":
            self.solver_options().gptq.check(spec)

    def working_memory(self, config: PretrainedConfig) -> WorkingMemory:
        """What autograd keeps of the weights for a step's backward: each linear's transformed, clipped and
        fake-quantized weight and their intermediates (as OmniQuant's LET and LWC)."""
        return WorkingMemory(weight_copies=1.0)

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        calibration = self.require_calibration(calibration)
        cfg: FlatQuantConfig = self.config  # type: ignore[assignment]
        adapter = get_adapter(model)
        t0 = time.perf_counter()
        hooks = FlatQuantHooks(spec, cfg, self.solver_options(), context.seed, adapter)
        blocks = run_blockwise(model, calibration, hooks, device=context.device, desc="flatquant", progress=context.progress)
        for b in blocks:
            b.pop("loss", None)
        return QuantizeResult(model, {"blocks": blocks, "wall_s": round(time.perf_counter() - t0, 3), "epochs": cfg.epochs,
                                      "samples": len(calibration), "transform": cfg.transform,
                                      "weight_solver": cfg.weight_solver})


class FlatQuantHooks(BlockHooks):
    """Per block: the teacher pass records the transforms' inputs; ``solve`` trains, merges and rounds the block."""

    def __init__(self, spec: BitSpec, cfg: FlatQuantConfig, solver: SolverOptions, seed: int, adapter) -> None:
        record = (adapter.attn_in.consumers[0], adapter.mlp_in.consumers[0], *(p.consumers[0] for p in adapter.mlp_outs))
        super().__init__(record=record if cfg.diag and cfg.diag_init == "sq_style" else ())
        self.spec, self.cfg, self.solver, self.seed = spec, cfg, solver, seed
        self.options = BlockOptions(form=cfg.transform, diag=cfg.diag,
                                    diag_alpha=cfg.diag_alpha if cfg.diag_init == "sq_style" else None,
                                    lwc=cfg.lwc, lac=cfg.lac)

    def solve(self, job: BlockJob) -> dict:
        t0 = time.perf_counter()
        cfg = self.cfg
        records = [r.abs_max for r in job.inputs] if job.inputs else [None] * len(job.layers)
        blocks = []
        for i, (layer, act_max) in enumerate(zip(job.layers, records)):
            # every matrix of every block its own random orthogonal start, from the run's seed
            seed = self.seed * 1_000_003 + 10_007 * (job.index + i)
            flat = FlatBlock(layer, job.adapter, self.spec, self.options, job.attention_geometry(), act_max, seed)
            flat.attach(layer)
            blocks.append(flat)
        groups = [g for flat, layer in zip(blocks, job.layers)
                  for g in flat.parameter_groups(layer, cfg.lr, cfg.clip_lr, cfg.train_transforms)]

        def loss_fn(idx: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(job.forward(job.rows(job.fp_inputs, idx)).float(), job.rows(job.targets, idx))

        # the official loop: in order, whole batches, each step on the relative error, cosine to lr / 1000
        history = train(groups, loss_fn, len(job.fp_inputs), epochs=cfg.epochs, batch_size=cfg.batch_size,
                        weight_decay=cfg.weight_decay, cosine_min_lr=cfg.lr * 1e-3, relative_loss=True, drop_last=True,
                        shuffle=False, label=job.label, device=job.device)
        if history:
            log.info("%s: loss %.4g after %d epochs (%.4g after the first)", job.label, history[-1], len(history), history[0])
        for flat, layer in zip(blocks, job.layers):
            flat.merge(layer)
            solve_block(job, layer, self.spec, self.solver)
        return {"epoch_losses": history, "seconds": round(time.perf_counter() - t0, 3),
                **({"loss": history[-1]} if history else {})}
