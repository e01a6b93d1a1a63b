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


def test_gptq_rounds_an_expert_no_token_reaches_to_nearest_and_never_quantizes_the_router(tiny_tokens):
    """A MoE block whose router never picks expert 3: GPTQ would zero every column of a linear whose Hessian is empty,
    so that expert's linears are rounded to nearest; the others are GPTQ's (not RTN's), and the router stays FP."""
    from harness import get_adapter, quantize_weight
    from harness.adapter.fused import Router
    from harness.models import tiny_model

    model = tiny_model("qwen3_moe", seed=0)
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        router = layer.get_submodule(adapter.routers[0])

        def never_three(x, router=router):
            logits = torch.nn.functional.linear(x.reshape(-1, router.in_features), router.weight)
            top, chosen = logits.masked_fill(torch.arange(4) == 3, -1e9).softmax(-1).topk(router.top_k, dim=-1)
            return top / top.sum(-1, keepdim=True), chosen

        router.forward = never_three
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = BitSpec.parse("W4A16")
    for true_sequential in (False, True):
        quantized = copy.deepcopy(model)
        weights = solved(quantized, tiny_tokens, spec, SolverOptions("gptq", true_sequential=true_sequential))
        assert {n for n in weights if ".experts.3." in n} and len(weights) == len(adapter.linear_names) * 2
        for name, w in weights.items():
            assert torch.equal(w, quantize_weight(original[name], spec)) == (".experts.3." in name), name
        for layer, before in zip(adapter.layers(quantized), adapter.layers(model)):
            router = layer.get_submodule(adapter.routers[0])
            assert type(router) is Router and torch.equal(router.weight, before.get_submodule(adapter.routers[0]).weight)
