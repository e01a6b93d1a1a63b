"""OS+: the migration is exact in FP (tiny random LLaMA with GQA), the batched threshold search picks what a
one-candidate-at-a-time transcription of the official search picks, the shift is exact on linears with biases,
and bad options or bit specs stop in one line.

The transcription (``official_search``) follows ModelTC/Outlier_Suppression_Plus 3ba97ae
``quant_transformer/quantization/migration_llama.py`` (``Migrator1DRangeSearch``, ``MigratorBase``) and the
official observer's quantization parameters (``observer.py`` ``calculate_qparams``), written out here.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import BitSpec, ConfigError, QuantContext, ScalePair, get_adapter, get_method, quant_linears
from harness.evaluation.evaluate import perplexity
from methods.osplus import (
    OSPlusConfig,
    attention_site,
    gated_site,
    linear_site,
    migrate,
    search_threshold,
    suppress,
    thresholds,
)
from tests.methods.quantized import assert_quantized

CPU = torch.device("cpu")
CTX = QuantContext(device=CPU, progress=False)
W4A4 = BitSpec.parse("W4A4")


# --- the official search, one candidate at a time ------------------------------------------------------

def official_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max fake quantization with one range per row (the official MinMaxObserver, ch_axis 0)."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    qmax = 2**bits - 1
    scale = torch.max((hi - lo) / qmax, torch.tensor(torch.finfo(torch.float32).eps))
    zero = torch.clamp(-torch.round(lo / scale), 0, qmax)
    return (torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero) * scale


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def official_qkv(heads, kv_heads, head_dim, cos, sin):
    """``qkv_function``: explicit attention with an additive causal mask and an fp32 softmax, as written officially."""
    def fn(x, weight):
        B, N, _ = x.shape
        qkv = torch.matmul(x, weight.T)
        sz_q, sz_kv = heads * head_dim, kv_heads * head_dim
        q = qkv[:, :, :sz_q].view(B, N, heads, head_dim).transpose(1, 2)
        k = qkv[:, :, sz_q:sz_q + sz_kv].view(B, N, kv_heads, head_dim).transpose(1, 2)
        v = qkv[:, :, sz_q + sz_kv:].view(B, N, kv_heads, head_dim).transpose(1, 2)
        q, k = q * cos[:, None] + rotate_half(q) * sin[:, None], k * cos[:, None] + rotate_half(k) * sin[:, None]
        k = k[:, :, None].expand(B, kv_heads, heads // kv_heads, N, head_dim).reshape(B, heads, N, head_dim)  # repeat_kv
        v = v[:, :, None].expand(B, kv_heads, heads // kv_heads, N, head_dim).reshape(B, heads, N, head_dim)
        mask = torch.full((N, N), torch.finfo(torch.float32).min).triu(1)
        attn = (q / math.sqrt(head_dim)) @ k.transpose(-2, -1) + mask
        attn = torch.max(attn, torch.tensor(torch.finfo(torch.float32).min)).softmax(dim=-1, dtype=torch.float32)
        return (attn @ v).transpose(1, 2).reshape(B * N, heads * head_dim)

    return fn


def official_up(x, weight):
    B, N, _ = x.shape
    gate, up = torch.matmul(x, weight.T).reshape(B, N, 2, weight.shape[0] // 2).permute(2, 0, 1, 3)
    return (F.silu(gate) * up).reshape(B * N, -1)


def official_down(x, weight):
    return torch.matmul(x, weight.T).reshape(-1, weight.shape[0])


def official_search(x, weight, output_fn, a_bits, w_bits):
    """``Migrator1DRangeSearch.search_migrate_range_1D`` and ``get_best_scale``: (threshold, scales)."""
    cmx, cmn = x.max(0)[0].max(0)[0], x.min(0)[0].min(0)[0]
    amx, amn = max(x.max(), torch.tensor(0.0)), min(x.min(), torch.tensor(0.0))
    num = max(100, int(amx / 0.5))
    output = output_fn(x, weight)

    def cac_scale(min_range, max_range):
        mx_scale = torch.where(cmx > max_range, cmx / max_range, torch.tensor(1.0))
        mn_scale = torch.where(cmn < min_range, cmn / min_range, torch.tensor(1.0))
        return torch.max(mx_scale, mn_scale)

    def cac_loss(min_range, max_range):
        s = cac_scale(min_range, max_range)
        xq = official_fake_quant((x / s).reshape(-1, x.shape[-1]), a_bits).reshape(x.shape)
        qoutput = output_fn(xq, official_fake_quant(weight * s, w_bits))
        return (qoutput - output).abs().pow(2.0).sum(-1).mean()

    best_loss = None
    bounds = (0.1, max(-amn.item(), amx.item()))
    step = (bounds[1] - bounds[0]) / num
    mx_range, st = bounds[1], bounds[1]
    while st >= bounds[0]:
        loss = cac_loss(torch.tensor(-st), torch.tensor(st))
        if best_loss is None or best_loss > loss:
            best_loss, mx_range = loss, st
        st -= step
    t = torch.tensor(mx_range)
    return t, cac_scale(-t, t)


def site_inputs(seed: int, shape: tuple[int, ...], outliers: dict[int, float]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    for channel, factor in outliers.items():
        x[..., channel] *= factor
    return x


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("site", ["qkv", "up_and_gate", "down_proj"])
def test_batched_search_picks_the_official_threshold(tiny_model, site, seed):
    layer = tiny_model.model.layers[0]
    config = OSPlusConfig(batch_mb=1)  # a few candidates per batch, so several batches
    if site == "qkv":
        names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        x = site_inputs(seed, (2, 16, 64), {3: 30.0, 17: 12.0})
        position_ids = torch.arange(16)[None]
        cos, sin = tiny_model.model.rotary_emb(x, position_ids)
        heads, kv_heads, head_dim = 4, 2, 16
        batched = attention_site(get_adapter(tiny_model), layer, (cos, sin))
        official = official_qkv(heads, kv_heads, head_dim, cos, sin)
    elif site == "up_and_gate":
        names = ("mlp.gate_proj", "mlp.up_proj")
        x = site_inputs(seed, (2, 16, 64), {5: 25.0})
        batched, official = gated_site(F.silu), official_up
    else:  # max |x| > 50: more than the minimum 100 steps
        names = ("mlp.down_proj",)
        x = site_inputs(seed, (2, 16, 128), {7: 60.0, 100: 9.0})
        batched, official = linear_site, official_down
    weights = [layer.get_submodule(n).weight.detach() for n in names]
    result = search_threshold(x, weights, [None] * len(weights), batched, W4A4, config)
    t, scales = official_search(x, torch.cat(weights), official, 4, 4)
    assert result.candidates > 100 if site == "down_proj" else result.candidates >= 100
    assert torch.tensor(result.threshold, dtype=torch.float32) == t, (result.threshold, t.item())
    torch.testing.assert_close(result.scales, scales, rtol=1e-6, atol=0)
    assert 1 < scales.max() and result.loss < result.loss_unscaled  # a real migration, better than none


def test_the_first_block_scales_its_qkv_site_as_the_official_search(outlier_model, tiny_tokens):
    """Block 0's q/k/v input is input_layernorm of the embeddings for the FP and the quantized model alike."""
    fp = copy.deepcopy(outlier_model)
    stats = suppress(outlier_model, tiny_tokens, W4A4, OSPlusConfig(), CTX, solver=None)
    layer = fp.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(fp.model.embed_tokens(tiny_tokens))
        cos, sin = fp.model.rotary_emb(x, torch.arange(x.shape[1])[None])
        weight = torch.cat([layer.self_attn.get_submodule(n).weight for n in ("q_proj", "k_proj", "v_proj")])
    t, scales = official_search(x, weight, official_qkv(4, 2, 16, cos, sin), 4, 4)
    assert torch.tensor(stats["jobs"][0]["sites"]["attn_in"]["threshold"], dtype=torch.float32) == t
    applied = layer.input_layernorm.weight / outlier_model.model.layers[0].input_layernorm.weight
    torch.testing.assert_close(applied, scales, rtol=1e-6, atol=0)


def test_thresholds_follow_the_official_grid():
    config = OSPlusConfig()
    grid = thresholds(300.0, -420.0, config)  # 600 steps (int(300 / 0.5)) down from 420
    step = (420.0 - 0.1) / 600
    assert grid[0] == 420.0 and grid[1] == pytest.approx(420.0 - step) and grid[-1] >= 0.1 > grid[-1] - step * 1.000001
    assert len(grid) in (600, 601)
    assert len(thresholds(20.0, -3.0, config)) in (100, 101)  # at least 100 steps
    assert thresholds(0.05, -0.02, config) == [0.05]  # all below t_min: no scaling
    assert len(thresholds(300.0, -1.0, OSPlusConfig(min_steps=10, step_unit=100.0, t_min=1.0))) in (10, 11)


# --- the transform ----------------------------------------------------------------------------------

def test_migration_keeps_the_fp_model(outlier_model, tiny_tokens):
    reference = copy.deepcopy(outlier_model)
    stats = suppress(outlier_model, tiny_tokens, W4A4, OSPlusConfig(), CTX, solver=None)
    with torch.no_grad():
        expected, got = reference(tiny_tokens).logits, outlier_model(tiny_tokens).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    for i, (before, after) in enumerate(zip(reference.model.layers, outlier_model.model.layers)):
        sites = stats["jobs"][i]["sites"]
        assert sites["attn_in"]["scaled_channels"] > 0 and sites["mlp_in"]["scaled_channels"] > 0
        assert not torch.equal(after.input_layernorm.weight, before.input_layernorm.weight)
        # o_proj's input is not a site (no v_proj -> o_proj scaling under GQA or otherwise), nor are the linears quantized
        assert torch.equal(after.self_attn.o_proj.weight, before.self_attn.o_proj.weight)
    assert not list(quant_linears(outlier_model))


class Pair(nn.Module):
    """A producer feeding two consumers, one with a bias and one without."""

    def __init__(self, producer: nn.Module) -> None:
        super().__init__()
        self.producer, self.a, self.b = producer, nn.Linear(6, 5), nn.Linear(6, 3, bias=False)

    def forward(self, x):
        h = self.producer(x)
        return torch.cat([self.a(h), self.b(h)], -1)


@pytest.mark.parametrize("producer", [lambda: nn.Linear(8, 6), lambda: nn.Linear(8, 6, bias=False), lambda: nn.LayerNorm(6)],
                         ids=["linear", "linear-no-bias", "layernorm"])
def test_shift_and_scale_are_exact_in_fp(producer):
    torch.manual_seed(0)
    pair = Pair(producer())
    with torch.no_grad():
        for p in pair.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(4, 7, 8 if isinstance(pair.producer, nn.Linear) else 6)
    expected = pair(x)
    with torch.no_grad():
        h = pair.producer(x)
        shift = (h.amax((0, 1)) + h.amin((0, 1))) / 2
        scales = torch.rand(6) * 5 + 1
        migrate(pair, ScalePair("p", "producer", ("a", "b")), scales, shift)
        torch.testing.assert_close(pair.producer(x), (h - shift) / scales, rtol=1e-5, atol=1e-5)  # centred, scaled input
        torch.testing.assert_close(pair(x), expected, rtol=1e-5, atol=1e-5)


def test_shift_is_refused_in_one_line_where_no_bias_can_take_it(outlier_model, tiny_tokens):
    with pytest.raises(ConfigError, match=r"^shift: true needs a bias on input_layernorm .*RMSNorm has none.*; use shift: false$"):
        get_method("os+").from_options({"shift": True}).quantize(outlier_model, W4A4, tiny_tokens, CTX)
    assert not list(quant_linears(outlier_model))  # refused before any work


# --- the method -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    ({"min_steps": 0}, r"min_steps: 0 is not allowed; use an integer >= 1"),
    ({"search_samples": 0}, r"search_samples: 0 is not allowed; use an integer >= 1"),
    ({"batch_mb": -5}, r"batch_mb: -5 is not allowed; use an integer >= 1"),
    ({"step_unit": 0}, r"step_unit: 0.0 is not allowed; use a number > 0"),
    ({"t_min": -0.1}, r"t_min: -0.1 is not allowed; use a number > 0"),
    ({"weight_solver": "awq"}, r"weight_solver: 'awq' is not allowed"),
    ({"treshold": 1}, r"treshold: unknown option"),
])
def test_bad_options_stop_in_one_line(options, match):
    with pytest.raises(ConfigError, match=rf"^methods\.os\+\.{match}") as err:
        get_method("os+").from_options(options)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bits", ["W4A16", "W16A4", "W16A16"])
def test_specs_without_weight_and_activation_bits_are_refused(bits, tiny_model, tiny_tokens):
    method = get_method("os+").from_options({})
    with pytest.raises(ConfigError, match=rf"^bits: {bits} is not allowed for os\+: .*use a spec that quantizes both"):
        method.check(BitSpec.parse(bits))
    with pytest.raises(ConfigError, match=r"^bits: "):  # the route every caller takes
        method.apply(tiny_model, BitSpec.parse(bits), tiny_tokens, CTX)


def test_needs_calibration_and_keys_the_solver_only_when_set(tiny_model):
    method = get_method("os+").from_options({})
    with pytest.raises(ConfigError, match="calibration"):
        method.quantize(tiny_model, W4A4, None, CTX)
    assert "weight_solver" not in method.config.to_dict()
    assert get_method("os+").from_options({"weight_solver": "gptq"}).config.to_dict()["weight_solver"] == "gptq"


@pytest.mark.parametrize("spec", [W4A4, BitSpec.parse("W8A8"), BitSpec.parse("W6A6", a_symmetric=True, w_symmetric=True),
                                  BitSpec.parse("W4A4g16")], ids=str)
def test_quantize_leaves_every_linear_quantized_at_the_spec(outlier_model, tiny_tokens, spec):
    result = get_method("os+").from_options({}).quantize(outlier_model, spec, tiny_tokens, CTX)
    assert_quantized(result.model, spec, 7 * 2)
    sites = result.stats["jobs"][0]["sites"]
    assert set(sites) == {"attn_in", "mlp_in", "mlp_out"} and all(s["loss"] <= s["loss_unscaled"] for s in sites.values())


def test_os_plus_beats_rtn_and_rounds_with_gptq_when_asked(outlier_model, tiny_tokens):
    fp, rtn, solved = (copy.deepcopy(outlier_model) for _ in range(3))
    get_method("rtn")().quantize(rtn, W4A4, None, CTX)
    get_method("os+").from_options({}).quantize(outlier_model, W4A4, tiny_tokens, CTX)
    get_method("os+").from_options({"weight_solver": "gptq"}).quantize(solved, W4A4, tiny_tokens, CTX)
    with torch.no_grad():
        target = fp(tiny_tokens).logits
        errors = {name: F.mse_loss(m(tiny_tokens).logits, target).item()
                  for name, m in (("rtn", rtn), ("os+", outlier_model), ("os+ gptq", solved))}
    assert errors["os+"] < errors["rtn"], errors
    assert errors["os+ gptq"] != errors["os+"] and all(m.frozen for _, m in quant_linears(solved))


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_w4a4_beats_rtn(smollm2, brown_calib, brown_eval, w4a4_ppl):
    """A coarse grid (about 10 candidates per site) keeps this to a few minutes on CPU."""
    model, _ = smollm2
    options = {"min_steps": 10, "step_unit": 100.0, "search_samples": 4}
    get_method("os+").from_options(options).quantize(model, W4A4, brown_calib, CTX)
    ppl = perplexity(model, brown_eval, device=CPU, progress=False)
    assert ppl < w4a4_ppl("rtn"), (ppl, w4a4_ppl("rtn"))
