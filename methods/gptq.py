"""GPTQ (Frantar et al., ICLR 2023): weights rounded column by column, each rounding error spread over
the columns not yet rounded through the inverse Hessian of the layer's reconstruction error.

The method applies no transform before the solver: block by block on the engine (``run_blockwise``,
one block per job), each block's linears are solved on the inputs the quantized model so far feeds
them (``harness.engine.solvers``, the official ``llama_sequential``), and the next block's inputs
come from the quantized block, as in the official loop (IST-DASLab/gptq 2d65066 ``llama.py``). The
solver itself is ``harness.quant.gptq`` (``gptq.py`` ``fasterquant``), shared with every method that
offers ``weight_solver: gptq``.

Defaults are the official argparse's: ``act_order`` and ``true_sequential`` off (its README's LLaMA
command turns both on: ``{name: gptq, act_order: true, true_sequential: true}``), dampening 0.01,
blocks of 128 columns, ranges that include 0. Weight-only specs are its setting (W4A16, W3A16,
W4A16g128; smollm2-135m's widths take groups of 64); with activation bits the activations are
quantized per token as for every method, and the Hessians see the inputs the quantized model feeds.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from transformers import PretrainedConfig

from harness import BitSpec, ConfigError, Method, MethodConfig, QuantContext, QuantizeResult, get_adapter, option, register_method
from harness.engine.blockwise import run_blockwise
from harness.engine.hooks import BlockHooks, BlockJob
from harness.engine.solvers import SolverOptions, solve_block
from harness.method import WorkingMemory
from harness.quant.gptq import GPTQOptions


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """GPTQ's options, as the official ``llama.py`` arguments."""

    block_size: int = option(128, "columns per lazy batch update (official --blocksize 128)")
    damp: float = option(0.01, "this fraction of the mean of diag H is added to its diagonal (official --percdamp .01)")
    act_order: bool = option(
        False, "round columns by decreasing diag H (official --act-order: off in its argparse, on in its README's LLaMA command)")
    static_groups: bool = option(
        False, "every group's range from the original weight up front (official --static-groups); act_order with groups needs it")
    true_sequential: bool = option(
        False, "solve k/v/q, then o, then up/gate, then down, each on inputs taken after the earlier ones are quantized "
        "(official --true-sequential)")
    zero_in_range: bool = option(
        True, "widen each range to include 0, as the official quantizer; false = the plain min/max of ptqbench's RTN")

    def solver(self) -> SolverOptions:
        gptq = GPTQOptions(self.block_size, self.damp, self.act_order, self.static_groups, self.zero_in_range)
        return SolverOptions("gptq", gptq, self.true_sequential)


@register_method
class GPTQ(Method):
    name = "gptq"
    description = "GPTQ: weights rounded column by column with second-order error compensation (Frantar et al. 2022)"
    config_class = GPTQConfig

    def check(self, spec: BitSpec) -> None:
        if not spec.quantizes_weights:
            raise ConfigError(f"bits: {spec.name} quantizes no weights; GPTQ rounds weights (e.g. W4A16, W3A16, W4A16g128)")
        self.config.solver().gptq.check(spec)

    def quantize(self, model, spec: BitSpec, calibration, context: QuantContext) -> QuantizeResult:
        calibration = self.require_calibration(calibration)
        options = self.config.solver()

        def solve(job: BlockJob) -> dict:
            linears = [s for layer in job.layers for s in solve_block(job, layer, spec, options)]
            return {"linears": linears, "loss": statistics.fmean(s["loss"] for s in linears)}

        # no teacher pass: the official loop never runs the FP block (its Hessians and outputs are the quantized model's)
        jobs = run_blockwise(model, calibration, BlockHooks(solve=solve, teacher=False), device=context.device, desc="gptq",
                             progress=context.progress)
        return QuantizeResult(model, {"jobs": jobs, "quantized_linears": sum(len(j["linears"]) for j in jobs)})

    def working_memory(self, config: PretrainedConfig) -> WorkingMemory:
        """The float32 Hessians of the linears solved together (all of a block's, or the largest sequential group),
        and the solver's two C x C copies (the dampened H and its inverse factor) of the widest input."""
        adapter = get_adapter(config)
        h, inter, experts = config.hidden_size, adapter.intermediate_size(config), max(1, adapter.experts)
        heads = config.num_attention_heads
        attn = heads * (getattr(config, "head_dim", None) or h // heads)
        groups = [[h, h, h], [attn], [h, h] * experts, [inter] * experts]  # input widths: q/k/v, o, gate/up, down (each expert's)
        together = max(sum(c * c for c in g) for g in groups) if self.config.true_sequential else sum(
            c * c for g in groups for c in g)
        return WorkingMemory(extra_bytes=4 * (together + 2 * max(h, attn, inter) ** 2))
