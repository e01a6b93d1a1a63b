"""SpinQuant (Liu et al., 2024): rotations learned so the quantized model's loss is lowest, then GPTQ or RTN.

QuaRot's rotations leave the FP model unchanged and spread outlier channels, but a random rotation is one of
many, and quantized models vary widely over them. SpinQuant learns two of them on the calibration windows:

- R1 (hidden x hidden, one per model) on the residual stream: the embedding writes h R1, every reader
  (q/k/v, gate/up, lm_head) reads through W R1, every writer (o_proj, down_proj) writes through R1ᵀ W;
- R2 (head_dim x head_dim, one per block) on each head of V: v_proj's rows R2ᵀ W_h, o_proj's columns W_h R2.

Both start as Hadamard matrices with random signs (``rotation: random``: random orthogonal ones) and are
trained by Cayley SGD (``harness.optim.cayley``: they stay orthogonal) on the next-token cross-entropy of the
fake-quantized model on the calibration windows. R3 (Q and K per head after RoPE where K is quantized: the
attention quantizer's ``rotate_qk``) and R4 (down_proj's input) are QuaRot's fixed online rotations. The learned
matrices are then folded into the weights through the adapter (exact in FP; R2 as the block-diagonal matrix of
its copies) and the weights rounded by ``weight_solver`` block by block on the engine, as ``quarot`` does
(facebookresearch/SpinQuant 8f47aa3: ``optimize_rotation.py``, ``train_utils/``, ``eval_utils/``).

Training never copies the model: each block runs through ``torch.func.functional_call`` with its weights
computed from R1 and R2 on the fly under activation checkpointing. The quantizers are the run's
(``quantize_block``) with the official straight-through rounding; as the official scripts do, rotations for GPTQ
weights are learned with FP weights where activations or the KV cache are quantized (``W16A4KV4`` for
``W4A4KV4``), and with the run's RTN-rounded weights otherwise.

Every family the adapter describes: where post-norms keep the residual stream from rotating (Gemma3) R1 runs
online at each reader (x -> x R1, W <- W R1), learned the same way; a MoE's router reads through W R1 and stays
FP, each expert's down_proj gets R4; a width without a Hadamard matrix gets QuaRot's R_K ⊗ H_m. Where ptqbench
differs from the official code, and why: docs/methods/spinquant.md.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig

from harness import BitSpec, ConfigError, Method, MethodConfig, QuantContext, QuantizeResult, get_adapter, option, register_method
from harness.adapter import LlamaAdapter
from harness.engine.blockwise import autocast, run_blockwise
from harness.engine.checkpoint import Checkpoint
from harness.engine.hooks import BlockHooks, BlockJob
from harness.engine.memory import TRAIN_TEMPORARIES
from harness.engine.solvers import SolverOptions, check_solver, solve_block
from harness.errors import TrainingDivergedError
from harness.method import WorkingMemory
from harness.models.lazy import block_store, materialized
from harness.optim.cayley import CayleySGD
from harness.progress import Progress
from harness.quant import attention
from harness.quant.gptq import GPTQOptions
from harness.quant.hadamard import has_hadamard, rotation_matrix, rotation_transform
from harness.quant.qlinear import quantize_block, with_input_transform
from harness.quant.quantizer import ActQuantizer, fake_quantize, group_view, row_range
from harness.quant.rotation import check_foldable, full_rotation, residual_online, residual_rotation, rotate_ends

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpinQuantConfig(MethodConfig):
    """SpinQuant's options, as the official ``scripts/10_optimize_rotation.sh`` and ``2_eval_ptq.sh`` set them."""

    steps: int = option(100, "Cayley SGD steps on the rotations (official --max_steps 100); 0 = the initial rotations")
    lr: float = option(1.5, "learning rate, the bound of each step below its 1/||W||_1 cap (official --learning_rate 1.5)")
    lr_schedule: Literal["cosine", "constant"] = option("cosine", "learning rate schedule, no warmup (official "
                                                                  "--lr_scheduler_type cosine)")
    batch_size: int = option(8, "calibration windows per step (official: 1 per GPU on 8 GPUs)")
    max_grad_norm: float = option(1.0, "the rotations' gradients are clipped to this global norm (the transformers "
                                       "Trainer default the official script keeps); 0 = no clipping")
    rotation: Literal["hadamard", "random"] = option(
        "hadamard", "initial R1 and R2: Hadamard matrices with random signs (official) or random orthogonal ones")
    weight_solver: Literal["rtn", "gptq"] = option("gptq", "how the rotated weights are rounded (official: GPTQ; "
                                                           "rtn = --w_rtn)")
    embed_mean: bool = option(False, "subtract each embedding row's mean as the official norm fusion does (not exact "
                                     "on LLaMA)")
    w_clip: bool = option(True, "search each weight row's clip ratio by the rounding error (official --w_clip)")
    true_sequential: bool = option(True, "GPTQ solves k/v/q, o, up/gate, down one after another (official gptq_fwrd)")
    act_order: bool = option(False, "GPTQ rounds columns by decreasing Hessian diagonal (official --act_order)")
    damp: float = option(0.01, "GPTQ dampening, a fraction of the mean Hessian diagonal (official --percdamp)")
    fp_activations: bool = option(True, "GPTQ's inputs come from the weight-quantized model with FP activations "
                                        "(official gptq_fwrd)")

    def __post_init__(self) -> None:
        rules = {"steps": (self.steps >= 0, "an integer >= 0"), "lr": (self.lr > 0, "a number > 0"),
                 "batch_size": (self.batch_size >= 1, "an integer >= 1"),
                 "max_grad_norm": (self.max_grad_norm >= 0, "a number >= 0 (0 = no clipping)"),
                 "lr_schedule": (self.lr_schedule in ("cosine", "constant"), "cosine or constant"),
                 "rotation": (self.rotation in ("hadamard", "random"), "hadamard or random")}
        for name, (ok, allowed) in rules.items():
            if not ok:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not allowed; use {allowed}")
        check_solver(self.weight_solver)


@dataclass
class Rotations:
    """R1 (hidden x hidden) and one R2 (head_dim x head_dim) per block, float64, and the training loss per step."""

    r1: torch.Tensor
    r2: list[torch.Tensor]
    losses: list[float]


@register_method
class SpinQuant(Method):
    name = "spinquant"
    description = ("SpinQuant: residual and per-head V/O rotations learned by Cayley SGD on the quantized model's loss, "
                   "online Hadamards on Q/K and down_proj, then GPTQ or RTN")
    config_class = SpinQuantConfig
    # the official scripts' settings: symmetric per-channel weights on the full grid (--w_clip), asymmetric
    # per-token activations (--a_asym) and K/V per head (--k_asym --v_asym, groups of head_dim), no clipping, Q FP
    quant_defaults: ClassVar[dict[str, Any]] = {
        "weight_symmetric": True, "act_symmetric": False, "symmetric_grid": "full", "act_clip_ratio": 1.0,
        "kv_clip_ratio": 1.0, "kv_symmetric": False, "attention": False}

    def solver_options(self) -> SolverOptions:
        c = self.config
        return SolverOptions(c.weight_solver, GPTQOptions(damp=c.damp, act_order=c.act_order, clip_search=c.w_clip),
                             true_sequential=c.true_sequential, fp_activations=c.fp_activations)

    def training_spec(self, spec: BitSpec) -> BitSpec:
        """The bits the rotations are learned at: FP weights before GPTQ where activations or the KV cache are quantized
        (the official README's W16A4KV4 for W4A4KV4), else the run's own."""
        if self.config.weight_solver == "gptq" and (spec.quantizes_activations or spec.quantizes_kv):
            return replace(spec, w_bits=16, w_group=0)
        return spec

    def check(self, spec: BitSpec) -> None:
        if self.config.weight_solver == "gptq":
            self.solver_options().gptq.check(spec)

    def working_memory(self, config: PretrainedConfig) -> WorkingMemory:
        """Training: the whole model in float32 on the device, a block's rotated weights and their gradients, R1/R2
        (float64, with gradients and the Cayley step's temporaries); per window token of a batch, every block's
        input (checkpointed), one block's recomputation and the logits with their gradient."""
        if not self.config.steps:
            return WorkingMemory()
        head_dim = get_adapter(config).attention_geometry(config)[2]
        layers, h, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
        eager = vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
        rotations = 4 * 8 * (h * h + layers * head_dim * head_dim)
        # sized on measured peaks (docs/methods/spinquant.md#memory-and-cost): the logits and their gradients, the
        # straight-through copies and online transforms of one block's recomputation, every block's input
        width = 8 * vocab + 2 * TRAIN_TEMPORARIES * (4 * h + 3 * get_adapter(config).intermediate_size(config))
        per_token = 4 * self.config.batch_size * (layers * h + width)
        return WorkingMemory(blocks_per_job=layers, weight_copies=2 / layers, extra_bytes=4 * eager + rotations,
                             token_bytes=per_token)

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        tokens = self.require_calibration(calibration)
        adapter = get_adapter(model)
        check_foldable(model, adapter)
        solver = self.solver_options()
        trained_at = self.training_spec(spec)
        rotations = resumed_rotations(model)
        if rotations is None:
            rotations = learn_rotations(model, tokens, trained_at, self.config, context)
        else:
            log.info("spinquant: the rotations of the killed run's checkpoint, not trained again")
        jobs = apply_rotations(model, spec, rotations, solver, tokens, context, embed_mean=self.config.embed_mean)
        return QuantizeResult(model, {"jobs": len(jobs), "rotation": self.config.rotation, "trained_at": trained_at.name,
                                      "steps": len(rotations.losses), "loss_curve": rotations.losses,
                                      "orthogonality_error": orthogonality_error(rotations),
                                      "residual": "online" if residual_online(adapter) else "offline"})


def apply_rotations(model: nn.Module, spec: BitSpec, rotations: Rotations, solver: SolverOptions, tokens: torch.Tensor,
                    context: QuantContext, embed_mean: bool = False) -> list[dict]:
    """Fold ``rotations`` into the model (embedding and head, then block by block with R3/R4 online) and round every
    block with ``solver``; return the engine's per-block stats."""
    adapter = get_adapter(model)
    online = residual_online(adapter)
    rotate_ends(model, adapter, rotations.r1, embed_mean=embed_mean)
    hooks = SpinQuantHooks(spec, solver, rotations, online, context.seed)
    # RTN weights need no data: the engine then walks the blocks without a pass
    return run_blockwise(model, tokens if solver.solver == "gptq" else None, hooks, device=context.device,
                         desc="spinquant", progress=context.progress)


def orthogonality_error(rotations: Rotations) -> float:
    """The largest |R Rᵀ - I| over R1 and every R2, to one digit (float rounding differs with memory layout)."""
    error = max(float((r @ r.T - torch.eye(len(r), dtype=r.dtype)).abs().max()) for r in (rotations.r1, *rotations.r2))
    return float(f"{error:.0e}")


def initial_rotations(rotation: str, hidden: int, head_dim: int, layers: int, seed: int) -> Rotations:
    """R1, then each block's R2: with ``hadamard`` diag(s) Hᵀ (R_K ⊗ H_m of ``seed`` for a width without a Hadamard
    matrix: ``rotation_matrix``), the signs drawn in that order from one generator seeded with ``seed`` (the official
    draws after ``transformers.set_seed(seed)``: R1 is ``random_hadamard(hidden, seed)``); with ``random`` random
    orthogonal matrices of ``seed``, ``seed + 1``, ..."""
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int, i: int) -> torch.Tensor:
        if rotation == "random":
            return residual_rotation("random", n, seed + i)
        return (torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1)[:, None] * rotation_matrix(n, seed)

    return Rotations(draw(hidden, 0), [draw(head_dim, 1 + i) for i in range(layers)], [])  # R1's signs drawn first


def resumed_rotations(model: nn.Module) -> Rotations | None:
    """The rotations a killed run of this model trained (its finished blocks were rotated by them), or None."""
    store = block_store(model)
    if store is None or store.work is None:
        return None
    saved = Checkpoint(store.work.parent / "engine", store.work, key=store.run_key).load()
    if saved is None or "r1" not in saved.state:
        return None
    return Rotations(saved.state["r1"], list(saved.state["r2"]), saved.state["losses"].tolist())


# -- the rotated weights, as functions of R1 and R2 -------------------------------------------------------------

def heads_out(t: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """v_proj's rows (heads x head_dim, in), or its bias, with each head's output y_h -> y_h R2."""
    d = r2.shape[0]
    if t.ndim == 1:
        return (t.reshape(-1, d) @ r2).reshape(t.shape)
    return (r2.T @ t.reshape(-1, d, t.shape[-1])).reshape(t.shape)


def heads_in(w: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """o_proj's weight (out, heads x head_dim) reading each head's input through R2: W_h -> W_h R2."""
    return (w.reshape(w.shape[0], -1, r2.shape[0]) @ r2).reshape(w.shape)


def rotated_parameters(layer: nn.Module, adapter: LlamaAdapter, r1: torch.Tensor, r2: torch.Tensor, online: bool,
                       seed: int) -> dict[str, torch.Tensor]:
    """The block's weights as :func:`rotate_block` leaves them, differentiable in ``r1`` and ``r2`` (the block's own
    weights are constants): norms folded (their weights set to factor 1), readers W diag(g) R1, v_proj per head
    R2ᵀ W_h, o_proj R1ᵀ W_h R2, each down_proj R1ᵀ W M (R4); writers (and a MoE router) keep their sides where R1
    runs ``online``."""
    get = layer.get_submodule
    params: dict[str, torch.Tensor] = {}
    for pair in (adapter.attn_in, adapter.mlp_in):
        norm = get(pair.producer)
        scale = adapter.norm_scale(norm)
        params[f"{pair.producer}.weight"] = torch.full_like(norm.weight, 1.0 - adapter.norm_offset)
        for name in pair.consumers:
            weight = adapter.scaled_weight(get(name).weight, columns=scale)
            params[f"{name}.weight"] = weight if online and name in adapter.routers else weight @ r1
    v_name, (o_name,) = adapter.attn_out.producer, adapter.attn_out.consumers
    params[f"{v_name}.weight"] = heads_out(params[f"{v_name}.weight"], r2)
    if get(v_name).bias is not None:
        params[f"{v_name}.bias"] = heads_out(get(v_name).bias, r2)
    writers = [(o_name, heads_in(get(o_name).weight, r2))]
    writers += [(name, rotation_transform(get(name).weight, seed)) for name in down_names(adapter)]
    for name, weight in writers:
        params[f"{name}.weight"] = weight if online else r1.T @ weight
        if get(name).bias is not None and not online:
            params[f"{name}.bias"] = get(name).bias @ r1
    return params


@torch.no_grad()
def rotate_block(layer: nn.Module, adapter: LlamaAdapter, r1: torch.Tensor, r2: torch.Tensor, online: bool,
                 seed: int) -> dict[str, nn.Module]:
    """Fold the block's norms, rotate it by R1 and R2 and fold R4 (exact in FP); return the online transforms it now
    needs by linear name: R4 before each down_proj (``full_rotation``: its Hadamard, or R_K ⊗ H_m of ``seed``), and R1
    at every reader but a MoE router where the residual stream keeps its basis.

    ``harness.quant.rotation.rotate_block`` takes one Hadamard for every head; a learned R2 is one matrix per block,
    applied here through the adapter as the block-diagonal matrix of its copies.
    """
    get = layer.get_submodule
    transforms: dict[str, nn.Module] = {}
    for pair in (adapter.attn_in, adapter.mlp_in):
        adapter.fold_norm(layer, pair)
        for name in pair.consumers:
            if online and name in adapter.routers:
                continue  # a router reads the stream, which keeps its basis, as it is
            adapter.rotate_input(get(name), r1)
            if online:  # a copy each: a block's tensors are stored unshared (lazy models, checkpoints)
                transforms[name] = LearnedRotation(r1)
    v_proj, o_proj, downs = get(adapter.attn_out.producer), get(adapter.attn_out.consumers[0]), down_names(adapter)
    if not online:
        for writer in (o_proj, *map(get, downs)):
            adapter.rotate_output(writer, r1)
    head_dim = r2.shape[0]
    adapter.rotate_output(v_proj, torch.block_diag(*[r2] * (v_proj.out_features // head_dim)))
    adapter.rotate_input(o_proj, torch.block_diag(*[r2] * (o_proj.in_features // head_dim)))
    for name in downs:  # W M, and x M online
        get(name).weight.data = rotation_transform(get(name).weight.double(), seed).to(get(name).weight.dtype)
        transforms[name] = full_rotation(get(name).in_features, seed)
    return transforms


def down_names(adapter: LlamaAdapter) -> list[str]:
    """down_proj of the block's MLP, or of each expert."""
    return [pair.consumers[0] for pair in adapter.mlp_outs]


class LearnedRotation(nn.Module):
    """Online: x -> x R1 at a reader whose residual stream keeps its basis (Gemma3). Deployed, R1 is a buffer, which an
    export refuses (no recipe rebuilds it); while it trains (``trained``), the parameter itself, owned by no model."""

    def __init__(self, r1: torch.Tensor, trained: bool = False) -> None:
        super().__init__()
        self._trained = (r1,) if trained else None
        if not trained:
            self.register_buffer("r1", r1.detach().to(torch.float32, copy=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r1 = self._trained[0] if self._trained else self.r1
        wide = torch.promote_types(x.dtype, torch.float32)
        return (x.to(wide) @ r1.to(x.device, wide)).to(x.dtype)

    def to_dict(self) -> dict:
        return {"kind": "spinquant.learned_rotation"}


class SpinQuantHooks(BlockHooks):
    """Per block: ``before`` rotates it by the learned matrices (its online transforms, R3 on Q/K with a KV part),
    ``solve`` rounds it with the weight solver, as QuaRot's hooks. The rotations are the hooks' ``state``, so a killed
    run's checkpoint keeps the matrices its finished blocks were rotated by (``resumed_rotations``)."""

    def __init__(self, spec: BitSpec, solver: SolverOptions, rotations: Rotations, online: bool, seed: int) -> None:
        super().__init__(teacher=False, student_activations=not (solver.solver == "gptq" and solver.fp_activations),
                         state={"r1": rotations.r1, "r2": torch.stack(rotations.r2),
                                "losses": torch.tensor(rotations.losses, dtype=torch.float64)})
        self.spec, self.solver, self.online, self.seed = spec, solver, online, seed

    def before(self, job: BlockJob) -> None:
        r1 = self.state["r1"].to(job.device)
        for offset, layer in enumerate(job.layers):
            r2 = self.state["r2"][job.index + offset].to(job.device)
            for name, transform in rotate_block(layer, job.adapter, r1, r2, self.online, self.seed).items():
                with_input_transform(layer, name, transform)
            if self.spec.quantizes_kv:  # R3: the K cache quantized in the basis of the per-head Hadamard
                r3(attention.install(layer.get_submodule(job.adapter.attention_path), self.spec), r2.shape[0], self.seed)

    def solve(self, job: BlockJob) -> None:
        for layer in job.layers:
            solve_block(job, layer, self.spec, self.solver)


def r3(quantizer: attention.AttentionQuantizer, head_dim: int, seed: int) -> None:
    """R3: Q and K rotated per head after RoPE before K is quantized (R_K ⊗ H_m of ``seed`` without a Hadamard)."""
    quantizer.rotate_qk = True
    if not has_hadamard(head_dim):
        quantizer.qk_seed = seed


# -- learning the rotations ---------------------------------------------------------------------------------------

class StraightThroughActivations(ActQuantizer):
    """The activation quantizer as the official STE: the gradient passes the rounding and the clamp unchanged and none
    goes through the range (ptqbench's own masks clamped entries, and each token's extremes can round just outside
    the grid, and trains through the range)."""

    @classmethod
    def of(cls, q: ActQuantizer) -> StraightThroughActivations:
        new = cls(q.bits, q.symmetric, q.clip_ratio, q.full_grid)
        new.enabled = q.enabled
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        with torch.no_grad():
            xmin, xmax = row_range(x)
            q = fake_quantize(x, xmin * self.clip_ratio, xmax * self.clip_ratio, self.bits, self.symmetric,
                              full_grid=self.full_grid)
        return x + (q - x).detach()


class StraightThroughWeights(nn.Module):
    """Min/max RTN of a weight, the gradient passed unchanged (the official training's ``STEQuantize``)."""

    def __init__(self, spec: BitSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            grouped = group_view(w, self.spec)
            xmin, xmax = row_range(grouped)
            q = fake_quantize(grouped, xmin, xmax, self.spec.w_bits, self.spec.w_symmetric,
                              full_grid=self.spec.full_grid).reshape(w.shape)
        return w + (q - w).detach()


class _Block(nn.Module):
    """One decoder block run on its own, for ``functional_call`` with its rotated weights."""

    def __init__(self, layer: nn.Module, adapter: LlamaAdapter, position_embeddings: object) -> None:
        super().__init__()
        self.layer, self.adapter, self.position_embeddings = layer, adapter, position_embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.run_layer(self.layer, hidden, self.position_embeddings)


@contextlib.contextmanager
def training_structure(model: nn.Module, adapter: LlamaAdapter, spec: BitSpec, r1: torch.Tensor, online: bool,
                       seed: int) -> Iterator[None]:
    """The blocks quantized as ``spec`` says with straight-through quantizers, R4 before down_proj, R3 on Q/K where K
    is quantized, and R1 online at the readers where it runs online; the blocks' plain linears are back afterwards."""
    layers = adapter.layers(model)
    attn_config = layers[0].get_submodule(adapter.attention_path).config
    kernel = attn_config._attn_implementation
    readers = [n for n in (*adapter.attn_in.consumers, *adapter.mlp_in.consumers) if n not in adapter.routers]
    originals = [(layer, name, layer.get_submodule(name)) for layer in layers for name in adapter.linear_names]
    try:
        for layer in layers:
            for qlinear in quantize_block(layer, spec, adapter).values():
                qlinear.act_quant = StraightThroughActivations.of(qlinear.act_quant)
                if spec.quantizes_weights:
                    qlinear.weight_quant = StraightThroughWeights(spec)
            for name in down_names(adapter):
                with_input_transform(layer, name, full_rotation(layer.get_submodule(name).in_features, seed))
            for name in readers if online else ():
                with_input_transform(layer, name, LearnedRotation(r1, trained=True))
            quantizer = getattr(layer.get_submodule(adapter.attention_path), attention.ATTRIBUTE, None)
            if quantizer is not None:
                quantizer.q, quantizer.k, quantizer.v = (StraightThroughActivations.of(q) for q in
                                                         (quantizer.q, quantizer.k, quantizer.v))
                if spec.quantizes_kv:
                    r3(quantizer, adapter.attention_geometry(model)[2], seed)
        yield
    finally:
        for layer, name, linear in originals:  # the QuantLinears hold the same weight and bias
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent), attr, linear)
        for layer in layers:
            attn = layer.get_submodule(adapter.attention_path)
            if hasattr(attn, attention.ATTRIBUTE):
                delattr(attn, attention.ATTRIBUTE)
        attn_config._attn_implementation = kernel


@contextlib.contextmanager
def _frozen_on(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """``modules`` in float32 on ``device`` with no gradient for their own parameters; as they were afterwards."""
    saved = [(m, next(m.parameters()).device, next(m.parameters()).dtype) for m in modules]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for m in modules:
            m.to(device=device, dtype=torch.float32).requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, where, dtype in saved:
            m.to(device=where, dtype=dtype)


def learn_rotations(model: nn.Module, tokens: torch.Tensor, spec: BitSpec, config: SpinQuantConfig,
                    context: QuantContext) -> Rotations:
    """Train R1 and every R2 on ``tokens`` (windows, seqlen) with the model quantized at ``spec``; the model is left as
    it was. Batches go through the windows in order, wrapping around (the official trainer's order)."""
    adapter = get_adapter(model)
    layers = list(adapter.layers(model))
    online = residual_online(adapter)
    device = context.device
    init = initial_rotations(config.rotation, model.config.hidden_size, adapter.attention_geometry(model)[2],
                             len(layers), context.seed)
    if not config.steps:
        return init
    r1 = nn.Parameter(init.r1.to(device))
    r2 = [nn.Parameter(r.to(device)) for r in init.r2]
    embed, norm, head = adapter.embed(model), adapter.final_norm(model), adapter.lm_head(model)
    batch = min(config.batch_size, len(tokens))
    losses: list[float] = []
    with materialized(model, 0, layers), _frozen_on([embed, norm, head, *layers], device), \
            training_structure(model, adapter, spec, r1, online, context.seed):
        positions = adapter.position_embeddings_to(adapter.position_embeddings(model, torch.zeros(1, tokens.shape[1], 1)),
                                                   device, torch.float32)
        runners = [_Block(layer, adapter, positions) for layer in layers]

        def block(runner: _Block, hidden: torch.Tensor, r1f: torch.Tensor, r2f: torch.Tensor) -> torch.Tensor:
            params = rotated_parameters(runner.layer, adapter, r1f, r2f, online, context.seed)
            return functional_call(runner, {f"layer.{k}": v for k, v in params.items()}, (hidden,))

        def loss_of(ids: torch.Tensor) -> torch.Tensor:
            r1f = r1.float()
            hidden = embed(ids).float()
            if config.embed_mean:
                hidden = hidden - hidden.mean(dim=-1, keepdim=True)
            hidden = hidden if online else hidden @ r1f
            for runner, r in zip(runners, r2):
                hidden = checkpoint(block, runner, hidden, r1f, r.float(), use_reentrant=False)
            hidden = hidden[:, :-1]  # the last position predicts nothing here: no logits for it
            logits = head(norm(hidden if online else hidden @ r1f.T))
            return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

        optimizer = CayleySGD([r1, *r2], lr=config.lr)
        cosine = config.lr_schedule == "cosine"  # transformers' cosine schedule without warmup, stepped after each step
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.steps)) if cosine else 1.0)
        bar = Progress(range(config.steps), desc="spinquant rotations", enabled=context.progress, unit="step")
        for step in bar:
            rows = torch.arange(step * batch, (step + 1) * batch) % len(tokens)
            with autocast(device):
                loss = loss_of(tokens[rows].to(device))
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"spinquant rotations, step {step}: loss is {loss.item()} (not finite); "
                                            "lower lr or check the calibration data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([r1, *r2], config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    if losses:
        log.info("spinquant: training loss %.4g -> %.4g over %d steps at %s", losses[0], losses[-1], len(losses), spec.name)
    return Rotations(r1.detach().cpu(), [r.detach().cpu() for r in r2], losses)
