"""Weight solvers: RTN with the clip search, and GPTQ on FP activations (QuaRot's gptq_fwrd)."""
from __future__ import annotations

import copy

import torch

from harness import BitSpec
from harness.engine.blockwise import run_blockwise
from harness.engine.hooks import BlockHooks, BlockJob
from harness.engine.solvers import SolverOptions, solve_block
from harness.quant.clip_search import clip_search_params
from harness.quant.gptq import GPTQOptions
from harness.quant.quantizer import grid_bounds, grid_codes, group_view


def solved(model, tokens, spec: BitSpec, options: SolverOptions, student_activations: bool = True) -> dict[str, torch.Tensor]:
    def solve(job: BlockJob) -> None:
        for layer in job.layers:
            solve_block(job, layer, spec, options)

    hooks = BlockHooks(solve=solve, teacher=False, student_activations=student_activations)
    run_blockwise(model, tokens, hooks, device=torch.device("cpu"), progress=False)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_rtn_with_the_clip_search_rounds_each_row_to_its_searched_range(tiny_model, tiny_tokens):
    spec = BitSpec.parse("W3A16", w_symmetric=True, symmetric_grid="full")
    original = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if n.endswith("proj.weight")}
    weights = solved(tiny_model, tiny_tokens, spec, SolverOptions("rtn", GPTQOptions(clip_search=True)))
    for name, w in original.items():
        scale, zero = clip_search_params(group_view(w, spec), spec)
        torch.testing.assert_close(weights[name], grid_codes(w, scale, zero, *grid_bounds(3, True, True)).mul_(scale))


def test_gptq_on_fp_activations_solves_the_same_weights_whatever_the_activation_bits(tiny_model, tiny_tokens):
    """With the activations FP for the Hessians and the student inputs, W4A4 sees what W4A16 sees."""
    options = SolverOptions("gptq", true_sequential=True, fp_activations=True)
    weight_only = solved(copy.deepcopy(tiny_model), tiny_tokens, BitSpec.parse("W4A16"), options)
    w4a4 = solved(copy.deepcopy(tiny_model), tiny_tokens, BitSpec.parse("W4A4"), options, student_activations=False)
    for name, w in weight_only.items():
        torch.testing.assert_close(w4a4[name], w, rtol=0, atol=1e-6)
    quantized_inputs = solved(copy.deepcopy(tiny_model), tiny_tokens, BitSpec.parse("W4A4"),
                              SolverOptions("gptq", true_sequential=True))
    assert any(not torch.allclose(quantized_inputs[n], w, atol=1e-6) for n, w in weight_only.items())
