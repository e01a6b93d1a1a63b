"""AWQ against transcriptions of the official search loops (mit-han-lab/llm-awq d6e797a ``auto_scale.py``
``_search_module_scale``, ``auto_clip.py`` ``auto_clip_layer``, ``quantizer.py`` ``pseudo_quantize_tensor``), its
scale folding exact in FP (with and without grouped-query attention), and the method end to end on the tiny LLaMA."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from harness import BitSpec, ConfigError, QuantContext, get_method
from harness.engine.blockwise import run_blockwise
from harness.engine.hooks import BlockHooks
from harness.models import tiny_llama
from methods.awq import apply_clip, clip_subsample, scale_groups, search_clip, search_scale

CTX = QuantContext(device=torch.device("cpu"), seed=0, progress=False)


def official_pseudo_quantize(w, n_bit, q_group_size):
    """``pseudo_quantize_tensor`` with zero_point=True, transcribed."""
    shape = w.shape
    if q_group_size > 0:
        w = w.reshape(-1, q_group_size)
    max_val, min_val = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    max_int = 2**n_bit - 1
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(0, max_int)
    return ((torch.clamp(torch.round(w / scales) + zeros, 0, max_int) - zeros) * scales).reshape(shape)


def official_clip(w, input_feat, n_bit, group, n_grid=20, max_shrink=0.5, n_sample_token=512):
    """``auto_clip_layer``, transcribed: the (out, tokens, groups, group size) product per candidate."""
    group = group if group > 0 else w.shape[1]
    input_feat = input_feat.view(-1, input_feat.shape[-1])
    input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group)
    input_feat = input_feat[:, 0 :: input_feat.shape[1] // n_sample_token]
    w = w.reshape(w.shape[0], 1, -1, group)
    org_max_val = w.abs().amax(dim=-1, keepdim=True)
    best_max_val = org_max_val.clone()
    min_errs = torch.ones_like(org_max_val) * 1e9
    org_out = (input_feat * w).sum(dim=-1)
    errors = []
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max_val * (1 - i_s / n_grid)
        cur_w = torch.clamp(w, -max_val, max_val)
        q_w = official_pseudo_quantize(cur_w, n_bit, group)
        cur_out = (input_feat * q_w).sum(dim=-1)
        err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)
        errors.append(err.squeeze(1).squeeze(-1))
        cur_best_idx = err < min_errs
        min_errs[cur_best_idx] = err[cur_best_idx]
        best_max_val[cur_best_idx] = max_val[cur_best_idx]
    return best_max_val.squeeze(1).squeeze(-1), torch.stack(errors)


def official_scale(block, linears, x, n_bit, group, n_grid=20):
    """``_search_module_scale``, transcribed: one candidate at a time, the block's state restored after each."""
    org_out = block(x)
    x_max = x.abs().view(-1, x.shape[-1]).mean(0)
    best_error, best_ratio, history = float("inf"), -1, []
    org_sd = {k: v.cpu().clone() for k, v in block.state_dict().items()}
    for ratio in range(n_grid):
        ratio = ratio * 1 / n_grid
        scales = x_max.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        for fc in linears:
            fc.weight.mul_(scales.view(1, -1))
            fc.weight.data = official_pseudo_quantize(fc.weight.data, n_bit, group) / scales.view(1, -1)
        loss = (org_out - block(x)).float().pow(2).mean().item()
        history.append(loss)
        if loss < best_error:
            best_error, best_ratio = loss, ratio
        block.load_state_dict(org_sd)
    return best_ratio, history


@pytest.mark.parametrize("bits, group", [("W4A16", 0), ("W3A16g16", 16), ("W4A16g32", 32)])
def test_clip_search_picks_the_official_bounds(bits, group):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g)
    x = torch.randn(4, 300, 64, generator=g) * torch.linspace(0.1, 4.0, 64)  # a few loud channels
    spec = BitSpec.parse(bits)
    expected, errors = official_clip(w, x, spec.w_bits, group, n_sample_token=150)
    got = search_clip(w, clip_subsample(x, 150), spec, clip_grid=20, max_shrink=0.5)
    assert got.shape == expected.shape == (96, 64 // (group or 64))
    # The same error in another summation order: the chosen candidate is the official one except where two
    # candidates' errors agree to rounding, and there its error is the official minimum.
    same = torch.isclose(got, expected, rtol=0, atol=0)
    assert same.float().mean() > 0.98
    steps = (1 - got / w.reshape(96, got.shape[1], -1).abs().amax(-1)).mul(20).round().long()  # the chosen i per group
    picked = errors.gather(0, steps.unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(picked, errors.min(dim=0).values, rtol=1e-4, atol=1e-12)


def test_clip_search_subsamples_every_nth_token():
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    torch.testing.assert_close(clip_subsample(x, 5), x.reshape(20, 3)[::4])
    torch.testing.assert_close(clip_subsample(x, 512), x.reshape(20, 3))  # fewer tokens than asked: all of them


@pytest.mark.parametrize("bits, group", [("W4A16", 0), ("W3A16g16", 16)])
def test_scale_search_on_a_linear_matches_the_official_loop(bits, group):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    x = torch.randn(3, 40, 64) * torch.linspace(0.05, 6.0, 64)
    block = copy.deepcopy(linear)
    with torch.no_grad():
        ratio, history = official_scale(block, [block], x, BitSpec.parse(bits).w_bits, group)
        before = linear.weight.clone()
        scales, got_ratio, losses = search_scale(x, [linear], linear, BitSpec.parse(bits), 20)
    assert got_ratio == ratio
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(history), rtol=1e-4, atol=0)
    assert torch.equal(linear.weight, before)  # the search leaves the weights as it found them
    act = x.abs().reshape(-1, 64).mean(0)
    expected = act.pow(ratio).clamp(min=1e-4)
    torch.testing.assert_close(scales, expected / (expected.max() * expected.min()).sqrt())


def test_scale_search_on_the_mlp_matches_the_official_loop(tiny_model):
    layer = tiny_model.model.layers[0]
    x = torch.randn(2, 24, 64) * torch.linspace(0.1, 5.0, 64)
    spec = BitSpec.parse("W3A16g32")
    with torch.no_grad():
        mlp = copy.deepcopy(layer.mlp)
        ratio, history = official_scale(mlp, [mlp.gate_proj, mlp.up_proj], x, 3, 32)
        _, got_ratio, losses = search_scale(x, [layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp, spec, 20)
    assert got_ratio == ratio
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(history), rtol=1e-4, atol=0)


@pytest.mark.parametrize("kv_heads, groups", [(2, ["attn_in", "mlp_in", "mlp_out"]), (4, ["attn_in", "attn_out", "mlp_in", "mlp_out"])])
def test_scaling_is_exact_in_fp_and_attn_out_is_skipped_under_gqa(kv_heads, groups):
    model = tiny_llama(seed=0, vocab_size=256, num_key_value_heads=kv_heads)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens).logits

    def solve(job):
        names = []
        for layer in job.layers:
            for group in scale_groups(job, layer):
                width = layer.get_submodule(group.pair.consumers[0]).in_features
                job.adapter.fold_scale(layer, group.pair, torch.rand(width, generator=torch.Generator().manual_seed(width)) * 4 + 0.1)
                names.append(group.pair.name)
        return {"groups": names}

    jobs = run_blockwise(model, tokens, BlockHooks(solve=solve), device=torch.device("cpu"), progress=False)
    assert [job["groups"] for job in jobs] == [groups, groups]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=1e-5, atol=1e-5)


def test_apply_clip_clamps_each_group():
    linear = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.arange(-8, 8, dtype=torch.float32).reshape(2, 8))
    apply_clip(linear, torch.tensor([[3.0, 1.0], [2.0, 5.0]]))
    expected = torch.tensor([[-3, -3, -3, -3, -1, -1, -1, -1], [0, 1, 2, 2, 4, 5, 5, 5]], dtype=torch.float32)
    assert torch.equal(linear.weight, expected)


def logits_error(model, fp, tokens) -> float:
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(tokens).logits, fp(tokens).logits).item()


def test_without_its_searches_awq_is_rtn(tiny_model, tiny_tokens):
    rtn, awq = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    spec = BitSpec.parse("W4A16g32")
    get_method("rtn")().quantize(rtn, spec, None, CTX)
    get_method("awq").from_options({"auto_scale": False, "auto_clip": False}).quantize(awq, spec, tiny_tokens, CTX)
    with torch.no_grad():
        assert torch.equal(rtn(tiny_tokens).logits, awq(tiny_tokens).logits)


def test_awq_reconstructs_the_model_better_than_rtn_at_three_bits(tiny_model, tiny_tokens):
    fp, rtn = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    spec = BitSpec.parse("W3A16g32")
    get_method("rtn")().quantize(rtn, spec, None, CTX)
    result = get_method("awq").from_options({"clip_tokens": 64}).quantize(tiny_model, spec, tiny_tokens, CTX)
    assert set(result.stats["scale_ratio"]) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    assert result.stats["scale_ratio"]["attn_out"] == []  # the tiny model has grouped-query attention
    assert logits_error(tiny_model, fp, tiny_tokens) < logits_error(rtn, fp, tiny_tokens)


def test_awq_rounds_with_gptq_when_asked(tiny_model, tiny_tokens):
    spec = BitSpec.parse("W3A16")
    plain, solved = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    get_method("awq").from_options({"clip_tokens": 64}).quantize(plain, spec, tiny_tokens, CTX)
    get_method("awq").from_options({"clip_tokens": 64, "weight_solver": "gptq"}).quantize(solved, spec, tiny_tokens, CTX)
    with torch.no_grad():
        assert not torch.allclose(plain(tiny_tokens).logits, solved(tiny_tokens).logits)


@pytest.mark.parametrize("options, match", [
    ({"n_grid": 0}, r"^methods\.awq\.n_grid: 0 is not allowed; use a positive integer$"),
    ({"max_shrink": 1.0}, r"^methods\.awq\.max_shrink: 1\.0 is not allowed; use a number in \(0, 1\)$"),
])
def test_bad_options_are_one_line(options, match):
    with pytest.raises(ConfigError, match=match):
        get_method("awq").from_options(options)


@pytest.mark.parametrize("bits, scheme, match", [
    ("W16A8", {}, r"^bits: W16A8 quantizes no weights; AWQ"),
    ("W4A16", {"w_granularity": "tensor"}, r"^quant\.weight_granularity: 'tensor' is not allowed with awq's auto_clip"),
])
def test_specs_it_cannot_serve_are_refused(bits, scheme, match):
    with pytest.raises(ConfigError, match=match):
        get_method("awq").from_options({}).check(BitSpec.parse(bits, **scheme))
