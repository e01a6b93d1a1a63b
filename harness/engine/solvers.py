"""Weight solvers: how a method rounds the weights of a block it has prepared (smoothed, rotated, ...).

``solve_block(job, layer, spec, solver)`` leaves every linear of ``layer`` a frozen ``QuantLinear``:

- ``rtn``: round to nearest on the bit spec's min/max grid (``quantize_block`` + ``freeze``);
- ``gptq``: GPTQ (``harness.quant.gptq``) as the official ``llama_sequential`` applies it
  (IST-DASLab/gptq 2d65066 ``llama.py``): per group of linears, hooks take each linear's inputs
  while the block runs on the student inputs (what the quantized model so far feeds it: earlier
  groups of the same block already quantized, later ones still FP), accumulate its Hessian sample
  by sample, and the group is solved, swapped for ``QuantLinear``s on the solver's grid and frozen.
  ``true_sequential`` takes the official groups k/v/q, o, up/gate, down; otherwise all seven
  linears see the same pass.

A method that wants a choice offers ``weight_solver: rtn | gptq`` and calls this; a plugin can too.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from harness.bits import BitSpec
from harness.engine.hooks import BlockJob
from harness.errors import ConfigError
from harness.quant.clip_search import clip_search_params
from harness.quant.gptq import FixedGridQuantizer, GPTQOptions, Hessian, gptq_solve
from harness.quant.qlinear import freeze, quantize_block, quantizers_disabled
from harness.quant.quantizer import group_view

log = logging.getLogger(__name__)

SOLVERS = ("rtn", "gptq")


def check_solver(name: str) -> None:
    """The one-line ``ConfigError`` for a ``weight_solver`` option that names no solver (a method config's check)."""
    if name not in SOLVERS:
        raise ConfigError(f"weight_solver: {name!r} is not allowed; use one of {SOLVERS}")


# Calibration tokens per forward pass while the Hessians are taken.
HESSIAN_TOKENS = 4096


@dataclass(frozen=True)
class SolverOptions:
    """What ``solve_block`` needs besides the block: the solver, GPTQ's options and its grouping.

    ``gptq.clip_search`` applies to ``rtn`` too (the official RTN's ``mse=True``). ``fp_activations``:
    the Hessians are taken with every activation and attention quantizer of the block off (its earlier
    linears' weights quantized): QuaRot's ``gptq_fwrd``, which runs before activation quantization is
    configured; otherwise the inputs are what the quantized model feeds (IST-DASLab/gptq at W4A16).
    """

    solver: str = "rtn"
    gptq: GPTQOptions = GPTQOptions()
    true_sequential: bool = False
    fp_activations: bool = False


def sequential_groups(job: BlockJob, true_sequential: bool) -> list[tuple[str, ...]]:
    """The groups of linears solved one after another (the official ``sequential`` lists; every expert's gate/up, then
    every expert's down_proj, in a MoE block; its router is never quantized)."""
    a = job.adapter
    if not true_sequential:
        return [a.linear_names]
    groups = [a.attn_in.consumers, a.attn_out.consumers, a.mlp_in.consumers, tuple(n for p in a.mlp_outs for n in p.consumers)]
    return [tuple(name for name in group if name in a.linear_names) for group in groups]


def solve_block(job: BlockJob, layer: nn.Module, spec: BitSpec, options: SolverOptions) -> list[dict]:
    """Quantize every linear of ``layer`` (one of ``job.layers``) with ``options.solver``; return per-linear stats."""
    if options.solver == "rtn" or not spec.quantizes_weights:
        swapped = quantize_block(layer, spec, job.adapter)
        if options.gptq.clip_search and spec.quantizes_weights:
            for qlinear in swapped.values():
                rows = group_view(qlinear.weight.detach().float(), spec)
                qlinear.weight_quant = FixedGridQuantizer(spec, *clip_search_params(rows, spec))
        freeze(layer)
        return []
    stats = []
    position = job.layers.index(layer)
    for names in sequential_groups(job, options.true_sequential):
        earlier = job.layers[:position + 1]
        with quantizers_disabled(*earlier, weights=False) if options.fp_activations else contextlib.nullcontext():
            hessians = _collect(job, position, layer, names)
        for name in names:
            started = time.perf_counter()
            linear, hessian = layer.get_submodule(name), hessians.pop(name)
            if not hessian.samples:  # no calibration token reached it (an expert no token was routed to): GPTQ
                (qlinear,) = quantize_block(layer, spec, job.adapter, include=lambda n, _l, name=name: n == name).values()
                if options.gptq.clip_search:  # would zero every column it never saw, so it is rounded to nearest
                    rows = group_view(qlinear.weight.detach().float(), spec)
                    qlinear.weight_quant = FixedGridQuantizer(spec, *clip_search_params(rows, spec))
                qlinear.freeze()
                log.info("%s: no calibration token reached %s; rounded to nearest", job.label, name)
                continue
            q, scale, zero, loss = gptq_solve(linear.weight.data.to(job.device), hessian.matrix, spec, options.gptq)
            (qlinear,) = quantize_block(layer, spec, job.adapter, include=lambda n, _l, name=name: n == name).values()
            qlinear.weight.data = q.to(qlinear.weight.device, qlinear.weight.dtype)
            qlinear.weight_quant = FixedGridQuantizer(spec, scale, zero)
            qlinear.freeze()
            stats.append({"linear": name, "loss": loss, "seconds": time.perf_counter() - started})
    return stats


@torch.no_grad()
def _collect(job: BlockJob, position: int, layer: nn.Module, names: tuple[str, ...]) -> dict[str, Hessian]:
    """The Hessians of ``names``' inputs, with the job's earlier blocks already quantized.

    The block runs on batches of about ``HESSIAN_TOKENS`` tokens (the official loop runs one sample
    at a time; a batch computes the same inputs in fewer, larger matmuls), and each sample is added
    on its own, in order, so the running mean is the official one.
    """
    hessians = {name: Hessian(layer.get_submodule(name).in_features, job.device) for name in names}

    def add(module: nn.Module, h: Hessian, x: torch.Tensor) -> None:
        transform = getattr(module, "input_transform", None)  # the weight multiplies the transformed input
        for sample in (x if transform is None else transform(x)).split(1):
            h.add(sample)

    hooks = [layer.get_submodule(name).register_forward_pre_hook(lambda m, args, h=hessians[name]: add(m, h, args[0]))
             for name in names]
    rows = max(1, HESSIAN_TOKENS // job.q_inputs.shape[1])
    try:
        for i in range(0, len(job.q_inputs), rows):
            x = job.forward(job.rows(job.q_inputs, slice(i, i + rows)), job.layers[:position])  # earlier blocks of the job
            job.forward(x, [layer])
    finally:
        for hook in hooks:
            hook.remove()
    return hessians
