"""QuaRot (Ashkboos et al., 2024): rotate the model so its activations have no outlier channels, then quantize.

An orthogonal change of basis Q of the residual stream (a Hadamard matrix times random signs,
seeded by the run's seed) and Hadamard rotations inside each block spread every outlier channel
over all channels, so per-token activation ranges shrink; the FP model is unchanged
(``harness.quant.rotation``: norm folding, an untied head, the residual rotation, the v/o and
down_proj Hadamard pairs whose second halves run online on o_proj's and down_proj's inputs). The
rotated linears are then rounded by ``weight_solver`` (official default GPTQ; ``rtn`` is its
``--w_rtn``), block by block on the engine, each block's GPTQ Hessians taken on the inputs the
rotated, quantized model so far feeds it, after the online transforms (official
``fake_quant/main.py`` + ``rotation_utils.py`` + ``gptq_utils.py``, spcl/QuaRot 5008669).

Families (``harness.adapter``): norms fold with their family's factor (Gemma's 1 + w); biases rotate with
their linears (Qwen2); Q/K norms (Qwen3, Gemma3) see q_proj's and k_proj's outputs unchanged, since only
their inputs are rotated. Gemma3's norms on each sublayer's output (before the residual add) do not
commute with a rotation of the residual stream, so there the stream keeps its basis and each reader
(q/k/v, gate/up) rotates its input online by the same Q (``harness.quant.rotation.ResidualRotation``):
the quantized activations and weights are those of the offline rotation.

Widths without a Hadamard matrix (Qwen2.5-0.5B's MLP 4864 = 19 x 256; a head dimension or hidden size
likewise) are rotated by R_K ⊗ H_m instead, R_K a random orthogonal K x K matrix of the run's seed and m the
largest power of two dividing the width (``harness.quant.hadamard.rotation_transform``): exact in FP like the
Hadamard, online at K + log2 m operations per element (``KroneckerRotation`` before down_proj). The run's
``rotations`` say which matrix each width got and what it costs online.

At ``W16A16`` the method only rotates: its perplexity equals FP's, a check a user can run on their
own model. Where ptqbench differs from the official code, each for a reason:
- a head tied to the embedding is untied first (the official code rotates the shared matrix twice);
- o_proj's online Hadamard is the full-width one after undoing v_proj's per-head one, which is the
  official across-heads Hadamard for a power-of-two head count and needs no Hadamard of the head
  count's order (smollm2-135m has 9 heads; the official code asserts there);
- the official norm fusion subtracts each embedding row's mean, a small FP change on LLaMA's
  RMSNorm; ``embed_mean: true`` reproduces it.

The bit spec's quantizers apply as for every method, with the paper's settings as the method's
``quant_defaults`` (symmetric full-grid weights and activations, activation clip 0.9, K/V asymmetric
clipped at 0.95, Q FP) where the sweep's ``quant:`` section is silent. With a KV part (``W4A4KV4``)
K and V are quantized per token and head after the Hadamard of the head dimension on Q and K (the
official ``QKRotationWrapper``: exact in FP). GPTQ runs as the official ``gptq_fwrd``: true-sequential,
each row's range from the clip search (``--w_clip``), Hessians and block inputs from the
weight-quantized model with FP activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PretrainedConfig

from harness import BitSpec, ConfigError, Method, MethodConfig, QuantContext, QuantizeResult, get_adapter, option, register_method
from harness.engine.blockwise import run_blockwise
from harness.engine.hooks import BlockHooks, BlockJob
from harness.engine.solvers import SolverOptions, check_solver, solve_block
from harness.quant import attention
from harness.quant.gptq import GPTQOptions
from harness.quant.hadamard import has_hadamard, rotation_cost, rotation_name
from harness.quant.qlinear import with_input_transform
from harness.quant.rotation import ResidualRotation, check_foldable, residual_online, rotate_block, rotate_ends


@dataclass(frozen=True)
class QuaRotConfig(MethodConfig):
    """QuaRot's options, as the official ``fake_quant/main.py`` arguments."""

    rotation: Literal["hadamard", "random"] = option(
        "hadamard",
        "the residual rotation Q: a Hadamard matrix with random signs, or a random orthogonal one (official --rotate_mode)")
    weight_solver: Literal["rtn", "gptq"] = option("gptq", "how the rotated weights are rounded (official: GPTQ; rtn = --w_rtn)")
    embed_mean: bool = option(False, "subtract each embedding row's mean as the official norm fusion does (not exact on LLaMA)")
    w_clip: bool = option(True, "search each weight row's clip ratio by the rounding error "
                                "(official --w_clip, the paper's setting)")
    true_sequential: bool = option(True, "GPTQ solves k/v/q, o, up/gate, down one after another (the official gptq_fwrd)")
    act_order: bool = option(False, "GPTQ rounds columns by decreasing Hessian diagonal (official --act_order)")
    damp: float = option(0.01, "GPTQ dampening, a fraction of the mean Hessian diagonal (official --percdamp)")
    fp_activations: bool = option(
        True, "GPTQ's inputs come from the weight-quantized model with FP activations (the official gptq_fwrd runs before "
        "activation quantization is configured); false = with the activations quantized too")

    def __post_init__(self) -> None:
        if self.rotation not in ("hadamard", "random"):
            raise ConfigError(f"rotation: {self.rotation!r} is not allowed; use hadamard or random")
        check_solver(self.weight_solver)


@register_method
class QuaRot(Method):
    name = "quarot"
    description = ("QuaRot: the model rotated by Hadamard transforms (exact in FP, online ones before o_proj and down_proj), "
                   "then GPTQ or RTN")
    config_class = QuaRotConfig
    # the paper's settings (spcl/QuaRot README, arXiv 2404.00456 Sec. 5): symmetric weights and activations on
    # the full signed grid, activations clipped at 0.9, K/V asymmetric clipped at 0.95, Q and (without a KV part)
    # K/V FP. The official argparse defaults are clip 1.0 (spcl/QuaRot#55): set them in quant: to reproduce those.
    quant_defaults = {"weight_symmetric": True, "act_symmetric": True, "symmetric_grid": "full", "act_clip_ratio": 0.9,
                      "kv_clip_ratio": 0.95, "kv_symmetric": False, "attention": False}

    def solver_options(self) -> SolverOptions:
        """How the rotated blocks are rounded: ``weight_solver`` with GPTQ as the official ``gptq_fwrd``."""
        c = self.config
        return SolverOptions(c.weight_solver, GPTQOptions(damp=c.damp, act_order=c.act_order, clip_search=c.w_clip),
                             true_sequential=c.true_sequential, fp_activations=c.fp_activations)

    def check(self, spec: BitSpec) -> None:
        if self.config.weight_solver == "gptq":
            self.solver_options().gptq.check(spec)

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        solver = self.solver_options()
        # RTN weights need no data: the engine then walks the blocks without a pass
        tokens = self.require_calibration(calibration) if solver.solver == "gptq" else None
        adapter = get_adapter(model)
        check_foldable(model, adapter)
        residual = ResidualRotation(self.config.rotation, model.config.hidden_size, context.seed)
        q = residual.matrix()
        rotate_ends(model, adapter, q, embed_mean=self.config.embed_mean)
        online = residual if residual_online(adapter) else None
        heads, _, head_dim = adapter.attention_geometry(model)
        hooks = QuaRotHooks(spec, solver, q, head_dim, online, seed=context.seed)
        jobs = run_blockwise(model, tokens, hooks, device=context.device, desc="quarot", progress=context.progress)
        return QuantizeResult(model, {"jobs": len(jobs), "rotation": self.config.rotation,
                                      "residual": "online" if online is not None else "offline",
                                      "rotations": self.rotations(model.config, heads * head_dim, head_dim, spec,
                                                                  online is not None, context.seed)})

    def rotations(self, config: PretrainedConfig, o_width: int, head_dim: int, spec: BitSpec, residual_online: bool,
                  seed: int) -> dict[str, str]:
        """What rotates each width (a Hadamard matrix, or R_K ⊗ H_m where the width has none) and, for the online
        ones, what it costs per element: the run's record of its rotations."""
        hidden, inter = config.hidden_size, get_adapter(config).intermediate_size(config)  # an expert's in a MoE

        def online(n: int) -> str:
            return f"{rotation_name(n, seed)} online, {rotation_cost(n)}"

        residual = (f"diag(s) {rotation_name(hidden, seed)} (signs of seed {seed})" if self.config.rotation == "hadamard"
                    else f"random orthogonal Q_{hidden} (seed {seed})")
        found = {"residual": residual + (" online at q/k/v and gate/up" if residual_online else ""),
                 "v_proj output per head": f"{rotation_name(head_dim, seed)} offline",
                 "o_proj input": f"per-head {rotation_name(head_dim, seed)} undone, then {online(o_width)}",
                 "down_proj input": online(inter)}
        if spec.quantizes_kv:
            found["Q and K per head"] = online(head_dim)
        return found


class QuaRotHooks(BlockHooks):
    """Per block: ``before`` rotates it (its online transforms, and the K cache's basis with a KV part),
    ``solve`` rounds it with the weight solver. No teacher pass (GPTQ takes its Hessians on the student
    inputs); the student inputs come from FP activations where GPTQ runs as the official ``gptq_fwrd``."""

    def __init__(self, spec: BitSpec, solver: SolverOptions, q: torch.Tensor, head_dim: int,
                 online: ResidualRotation | None = None, seed: int = 0) -> None:
        super().__init__(teacher=False, student_activations=not (solver.solver == "gptq" and solver.fp_activations))
        self.spec, self.solver, self.q, self.head_dim, self.online, self.seed = spec, solver, q, head_dim, online, seed

    def before(self, job: BlockJob) -> None:
        for layer in job.layers:
            transforms = rotate_block(layer, job.adapter, self.q.to(job.device), self.head_dim, self.online, seed=self.seed)
            for name, transform in transforms.items():
                with_input_transform(layer, name, transform)
            if self.spec.quantizes_kv:  # the K cache quantized in the basis of the per-head Hadamard (exact in FP)
                quantizer = attention.install(layer.get_submodule(job.adapter.attention_path), self.spec)
                quantizer.rotate_qk = True
                if not has_hadamard(self.head_dim):  # R_K ⊗ H_m of the run's seed
                    quantizer.qk_seed = self.seed

    def solve(self, job: BlockJob) -> None:
        for layer in job.layers:
            solve_block(job, layer, self.spec, self.solver)
