"""Channel reassembly (methods/qllm/reassembly.py + its block surgery in methods/qllm/method.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from harness import BitSpec, LlamaAdapter, quantize_block
from harness.engine.calibration_stats import channel_abs_max as channel_max
from methods.qllm.method import SITES, QLLMConfig, apply_plan, reassemble_site, site_function
from methods.qllm.reassembly import (
    OFFICIAL_LOSS_CAP,
    assemble_first_plan,
    channel_distances,
    make_plan,
    search,
    site_error,
    theta_grid,
)

W4A4 = BitSpec.parse("W4A4")


def with_outliers(model):
    """Give the tiny random model the LLaMA-like outlier channels QLLM targets."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17, 40]] *= 25.0
            layer.post_attention_layernorm.weight[[5, 9]] *= 15.0
            layer.mlp.up_proj.weight[[7, 70, 100]] *= 30.0
    return model


def site_features(layer, x, position_embeddings):
    """FP features of every site of ``layer`` for input ``x`` (what the method's hooks record)."""
    feats, adapter = {}, LlamaAdapter()
    handles = [layer.get_submodule(getattr(adapter, s).producer).register_forward_hook(
        lambda m, a, out, s=s: feats.__setitem__(s, out.detach())) for s in ("attn_in", "mlp_in")]
    handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: feats.__setitem__("mlp_out", a[0].detach())))
    with torch.no_grad():
        adapter.run_layer(layer, x, position_embeddings)
    for h in handles:
        h.remove()
    return feats


@pytest.fixture
def block(tiny_model, tiny_tokens):
    model = with_outliers(tiny_model)
    adapter = LlamaAdapter()
    with torch.no_grad():
        hidden = model.model.embed_tokens(tiny_tokens)
    pe = adapter.position_embeddings(model, hidden)
    return model, model.model.layers[0], hidden, pe


def test_disassembly_alone_is_exact(tiny_model, tiny_tokens):
    model = with_outliers(tiny_model)
    with torch.no_grad():
        reference = model(tiny_tokens).logits
        hidden = model.model.embed_tokens(tiny_tokens)
    pe = LlamaAdapter().position_embeddings(model, hidden)
    widths = {}
    for layer in model.model.layers:
        feats = site_features(layer, hidden, pe)
        for site in SITES:
            x_max = channel_max(feats[site])
            theta = float(x_max.median())  # splits about half of the channels, some into many parts
            plan = make_plan(x_max, theta, None, None, assemble=False)
            assert plan.added > 0 and plan.merged == 0
            apply_plan(layer, site, plan)
            widths.setdefault(site, plan.width)  # layer 0
        with torch.no_grad():
            hidden = LlamaAdapter().run_layer(layer, hidden, pe)
    assert model.model.layers[0].mlp.down_proj.module.in_features == widths["mlp_out"] > 128
    with torch.no_grad():
        out = model(tiny_tokens).logits
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_plan_never_merges_sub_channels_and_keeps_width():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 32, generator=g)
    x[:, [2, 11]] *= 5
    w = torch.randn(16, 32, generator=g)
    x_max = channel_max(x)
    plan = make_plan(x_max, float(x_max.sort().values[-3]), x, w, assemble=True)  # splits the two outliers
    assert plan.added > 0 and plan.merged == plan.added and plan.width == 32
    assert plan.count.sum() == plan.src.numel()
    for g_out in range(plan.width):
        members = (plan.group == g_out).nonzero().flatten()
        if len(members) > 1:
            assert (plan.scale[members] == 1).all(), "a disassembled sub-channel was merged"


def quantized_site_output(layer, site, feats, pe):
    """The site's output through the installed (reassembled, quantized) modules, recomputed directly."""
    if site == "mlp_out":
        return layer.mlp.down_proj(feats)
    if site == "mlp_in":
        x = layer.post_attention_layernorm.reassembly(feats)
        return layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
    captured = {}
    handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    layer.self_attn(layer.input_layernorm.reassembly(feats), position_embeddings=pe, attention_mask=None)
    handle.remove()
    return captured["x"]


def fp_site_output(layer, site, feats, pe):
    if site == "mlp_out":
        return layer.mlp.down_proj(feats)
    if site == "mlp_in":
        return layer.mlp.act_fn(layer.mlp.gate_proj(feats)) * layer.mlp.up_proj(feats)
    captured = {}
    handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    layer.self_attn(feats, position_embeddings=pe, attention_mask=None)
    handle.remove()
    return captured["x"]


@pytest.mark.parametrize("site", SITES)
def test_reassembly_keeps_width_and_recorded_error_is_real(block, site):
    _, layer, hidden, pe = block
    feats = site_features(layer, hidden, pe)[site]
    fp_layer = copy.deepcopy(layer)
    quantize_block(layer, W4A4, LlamaAdapter())
    x_max = channel_max(feats)
    theta = float(x_max.max()) / 3  # forces a reassembly with merges
    cfg = QLLMConfig(theta="fixed", theta_value=theta)
    stats = reassemble_site(layer, site, x_max, feats, W4A4, cfg, pe)
    assert stats["added"] > 0 and stats["merged"] == stats["added"]
    for path in getattr(LlamaAdapter(), site).consumers:
        linear = fp_layer.get_submodule(path)
        new = layer.get_submodule(path)
        new = getattr(new, "module", new)
        assert new.in_features == linear.in_features == new.weight.shape[1]
    with torch.no_grad():
        err = F.mse_loss(quantized_site_output(layer, site, feats, pe), fp_site_output(fp_layer, site, feats, pe)).item()
    assert err == pytest.approx(stats["error_after"], rel=1e-4)


@pytest.mark.parametrize("site", SITES)
def test_adaptive_search_is_never_worse_than_no_op(block, site):
    _, layer, hidden, pe = block
    feats = site_features(layer, hidden, pe)[site]
    consumers, fn = site_function(layer, site, pe)
    weights = [layer.get_submodule(c).weight.detach() for c in consumers]
    x_max = channel_max(feats)
    grid = theta_grid(x_max, 0.2)
    assert grid[0] == pytest.approx(float(x_max.max()))
    with torch.no_grad():
        result = search(fn, feats, x_max, weights, W4A4, thetas=grid[1:], assemble=True)
        reference = fn(feats, weights)
        no_op = site_error(fn, feats, weights, reference, None, W4A4)
        errors = []
        for theta in grid[1:]:
            plan = make_plan(x_max, theta, feats.reshape(-1, feats.shape[-1]), torch.cat(weights), True)
            if plan is not None:
                errors.append(site_error(fn, feats, weights, reference, plan, W4A4))
    assert result.error_before == pytest.approx(no_op)
    assert result.error_after <= no_op
    assert result.error_after == pytest.approx(min([no_op, *errors]))
    assert result.candidates == len(errors) > 0


def test_theta_grid_respects_the_channel_budget():
    x_max = torch.tensor([0.5] * 90 + [3.0, 5.0, 8.0, 20.0, 40.0, 1.0, 1.2, 2.0, 2.5, 60.0])
    grid = theta_grid(x_max, 0.2)
    added = [int(torch.ceil(x_max / t).clamp(min=1).sum()) - 100 for t in grid]
    assert added[0] == 0 and all(a <= 20 for a in added)
    assert added == sorted(added) and len(set(added)) == len(added)  # one candidate per change


def official_assemble_then_disassemble(x, w, x_max, theta):
    """One candidate of the official search, transcribed op by op for an even width (ModelTC/QLLM 653a329e
    reassembly/cr_module.py L12-41 scores, L102-116 mask, L79-92 matching, L176-226; assembly/ca_module.py
    L89-119): (x, w) after assembling the original channels and then splitting the outliers."""
    C = x.shape[-1]
    num = torch.clamp(torch.ceil(x_max / theta), min=1.0)
    r = int(num.int().sum()) - C
    xa, xb, wa, wb = x[:, ::2], x[:, 1::2], w[:, ::2], w[:, 1::2]
    xdist = torch.cdist(xa.t(), xb.t(), p=2.0)
    scores_a, scores_b = torch.zeros(C // 2, C // 2, dtype=x.dtype), torch.zeros(C // 2, C // 2, dtype=x.dtype)
    for i in range(C // 2):
        scores_a[i, :] = (wa[:, i].unsqueeze(1) * xdist[i]).sum(0)
    for j in range(C // 2):
        scores_b[:, j] = (wb[:, j].unsqueeze(1) * xdist[:, j]).sum(0)
    scores = (scores_a + scores_b).pow(2)
    split = num > 1.0
    scores[split[::2].nonzero().flatten(), :] = torch.finfo(scores.dtype).max
    scores[:, split[1::2].nonzero().flatten()] = torch.finfo(scores.dtype).max
    node_min, node_idx = scores.min(dim=-1)
    src_idx = node_min.argsort(dim=-1)[:r]
    dst_idx = node_idx[src_idx]

    def assembly(t):  # mode "sum" on (rows, C)
        src, dst = t[:, 0::2], t[:, 1::2].clone()
        dst = dst.scatter_reduce(-1, dst_idx.expand(t.shape[0], r), src.gather(-1, src_idx.expand(t.shape[0], r)), reduce="sum")
        mask = torch.ones(C)
        mask[torch.arange(0, C, 2)[src_idx]] = 0.0
        return torch.stack([src, dst], dim=-1).reshape(t.shape[0], C)[:, mask != 0]

    size = torch.ones(1, C, dtype=x.dtype)
    assembled_x = assembly(x) / assembly(size)
    assembled_num = (assembly(num[None].to(x.dtype)) / assembly(size))[0]
    assembled_scale = (assembly((1.0 / num)[None].to(x.dtype)) / assembly(size))[0]
    keep = torch.ones(C, dtype=torch.bool)
    keep[torch.arange(0, C, 2)[src_idx]] = False
    assembled_w = w.scatter_reduce(-1, torch.arange(1, C, 2)[dst_idx].expand(w.shape[0], r),
                                   w.gather(-1, torch.arange(0, C, 2)[src_idx].expand(w.shape[0], r)), reduce="sum")[:, keep]
    reps = assembled_num.int()
    split_x = torch.repeat_interleave(assembled_x, reps, dim=1) * assembled_scale.repeat_interleave(reps)[None]
    return split_x, torch.repeat_interleave(assembled_w, reps, dim=1)


def test_assemble_first_plan_is_the_official_proxy_and_not_the_applied_plan():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64)
    x[:, [2, 11, 26]] *= torch.tensor([6.0, 9.0, 4.0], dtype=torch.float64)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    x_max = channel_max(x).double()
    theta = float(x_max.sort().values[-4]) * 1.05  # splits the three outliers only, one of them in three or more
    plan = assemble_first_plan(x_max, theta, x, w)
    expected_x, expected_w = official_assemble_then_disassemble(x, w, x_max, theta)
    assert plan.added >= 4 and plan.merged == plan.added and plan.width == 40
    torch.testing.assert_close(plan.module()(x), expected_x, rtol=1e-6, atol=1e-9)  # the plan's 1 / T is float32
    torch.testing.assert_close(plan.apply_weight(w), expected_w, rtol=1e-12, atol=1e-12)  # sums in another order
    applied = make_plan(x_max, theta, x, w, assemble=True)
    assert applied.added == plan.added and not torch.equal(applied.group, plan.group)  # another merge


def _grid_errors(fn, feats, weights, x_max, spec, builder):
    tokens, stacked, reference = feats.reshape(-1, feats.shape[-1]), torch.cat(weights), fn(feats, weights)
    out = []
    for theta in theta_grid(x_max, 0.2)[1:]:
        plan = builder(x_max, theta, tokens, stacked)
        if plan is not None and plan.added:
            out.append((theta, site_error(fn, feats, weights, reference, plan, spec)))
    return out


def test_official_search_order_scores_the_proxy_and_applies_disassemble_first(block):
    """search(order="official"): the theta whose assemble-first proxy scores lowest (first of equals), then
    that theta's disassemble-first plan, with its own error; recomputed here from the two builders."""
    _, layer, hidden, pe = block
    features, differs = site_features(layer, hidden, pe), []
    for site in SITES:
        feats = features[site]
        consumers, fn = site_function(layer, site, pe)
        weights = [layer.get_submodule(c).weight.detach() for c in consumers]
        x_max = channel_max(feats)
        with torch.no_grad():
            result = search(fn, feats, x_max, weights, W4A4, thetas=theta_grid(x_max, 0.2)[1:], assemble=True, order="official")
            default = search(fn, feats, x_max, weights, W4A4, thetas=theta_grid(x_max, 0.2)[1:], assemble=True)
            proxy = _grid_errors(fn, feats, weights, x_max, W4A4, assemble_first_plan)
            applied = dict(_grid_errors(fn, feats, weights, x_max, W4A4, lambda m, t, x, w: make_plan(m, t, x, w, True)))
        theta, scored = min(proxy, key=lambda te: te[1])
        assert scored < result.error_before  # so the winner is a plan, not the no-op
        assert result.plan.theta == theta and result.error_scored == pytest.approx(scored)
        assert result.error_after == pytest.approx(applied[theta])
        differs.append(result.plan.theta != default.plan.theta or result.error_after != pytest.approx(default.error_after))
    assert any(differs)


def test_noop_candidate_false_keeps_the_official_loss_cap(tiny_model, tiny_tokens):
    """Without outliers no split helps: the default keeps the site as it is, noop=False takes the best
    candidate anyway, and only scores >= the official 100000 cap leave the site alone."""
    layer = tiny_model.model.layers[0]
    with torch.no_grad():
        hidden = tiny_model.model.embed_tokens(tiny_tokens)
    pe = LlamaAdapter().position_embeddings(tiny_model, hidden)
    feats = site_features(layer, hidden, pe)["mlp_in"]
    consumers, fn = site_function(layer, "mlp_in", pe)
    weights = [layer.get_submodule(c).weight.detach() for c in consumers]
    x_max = channel_max(feats)
    thetas = theta_grid(x_max, 0.2)[1:]
    with torch.no_grad():
        default = search(fn, feats, x_max, weights, W4A4, thetas=thetas, assemble=True)
        official = search(fn, feats, x_max, weights, W4A4, thetas=thetas, assemble=True, noop=False)
        capped = search(lambda x, w: fn(x, w) * 1e6, feats, x_max, weights, W4A4, thetas=thetas, assemble=True, noop=False)
        candidates = _grid_errors(fn, feats, weights, x_max, W4A4, lambda m, t, x, w: make_plan(m, t, x, w, True))
    theta, best = min(candidates, key=lambda te: te[1])
    assert best > default.error_before and default.plan is None and default.error_after == default.error_before
    assert official.plan.theta == theta and official.error_after == pytest.approx(best) and best > official.error_before
    assert capped.error_before > OFFICIAL_LOSS_CAP and capped.plan is None and capped.candidates == len(candidates)


@pytest.mark.parametrize("case", ["independent", "correlated", "duplicates", "tiny-and-huge"])
def test_channel_distances_are_the_direct_float64_distances_bit_for_bit(case):
    """The product-based distances with their error bound equal the direct loop's, rounded to float32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 300, generator=g) * torch.rand(300, generator=g) * 4
    if case == "correlated":  # channels sharing one dominant direction: |a|^2 + |b|^2 - 2ab cancels
        x = x * 1e-3 + torch.randn(256, 1, generator=g) * torch.rand(300, generator=g)
    if case == "duplicates":
        x[:, 10] = x[:, 11]  # identical, nearly identical and all-zero channels
        x[:, 20] = x[:, 21] + 1e-7
        x[:, 30] = 0.0
        x[:, 31] = 0.0
    if case == "tiny-and-huge":
        x[:, :50] *= 1e-6
        x[:, 50:60] *= 1e4
    xt = x.t().double()
    expected = torch.cdist(xt, xt, compute_mode="donot_use_mm_for_euclid_dist").float()
    assert torch.equal(channel_distances(x), expected)
    assert torch.equal(channel_distances(x, rows_per_chunk=7), expected)  # chunks that do not divide C
