"""SmoothQuant: exact in FP, the official scale formula, flatter activations, and perplexity on smollm2.

Activation statistics here are gathered with the tests' own hooks, not with the harness helper the
method uses, so a bug there cannot hide itself.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from harness import FP, BitSpec, ConfigError, QuantContext, get_method
from harness.evaluation.evaluate import perplexity
from methods.smoothquant import SmoothQuantConfig, smooth
from tests.methods.quantized import assert_quantized

CPU = torch.device("cpu")
CTX = QuantContext(device=CPU, progress=False)
PAIRS = {"attn_in": ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
         "mlp_in": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))}


def channel_abs_max(model: nn.Module, tokens: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """max |input| per channel of each named module over all of ``tokens``, with plain forward hooks."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, args, _out, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0)))
        for n in names]
    with torch.no_grad():
        model(tokens, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.stack(v).amax(0) for n, v in seen.items()}


def ratio(x: torch.Tensor) -> float:
    return (x.max() / x.median()).item()


def smoothed_inputs(model: nn.Module) -> list[str]:
    n = len(model.model.layers)
    return [f"model.layers.{i}.{c[0]}" for i in range(n) for _, c in PAIRS.values()]


# --- config --------------------------------------------------------------------------------------

def test_config_validates_alpha():
    assert SmoothQuantConfig().alpha == 0.5
    assert SmoothQuantConfig.from_dict({"alpha": 1}).alpha == 1.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"alpha: .* use a number in \[0, 1\]"):
            SmoothQuantConfig(alpha=bad)
    with pytest.raises(ConfigError, match="alph"):
        get_method("smoothquant").from_options({"alhpa": 0.5})


def test_needs_calibration(tiny_model):
    method = get_method("smoothquant").from_options({})
    assert method.needs_calibration
    with pytest.raises(ConfigError, match="calibration"):
        method.quantize(tiny_model, BitSpec.parse("W8A8"), None, CTX)


# --- smoothing on the tiny model --------------------------------------------------------------------

def test_smoothing_alone_keeps_logits(outlier_model, tiny_tokens):
    reference = copy.deepcopy(outlier_model)
    result = get_method("smoothquant").from_options({"alpha": 0.5}).quantize(outlier_model, FP, tiny_tokens, CTX)
    with torch.no_grad():
        expected = reference(tiny_tokens).logits
        got = result.model(tiny_tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # ... while the weights really changed, by different factors per channel (outliers most).
    changed = reference.model.layers[0].input_layernorm.weight / result.model.model.layers[0].input_layernorm.weight
    assert changed.max() / changed.min() > 3


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_scales_follow_the_official_formula(outlier_model, tiny_tokens, alpha):
    """s recovered from the changed weights equals max|X|^a / max|W|^(1-a) computed independently."""
    original = copy.deepcopy(outlier_model)
    act = channel_abs_max(original, tiny_tokens, [f"model.layers.{i}.{c[0]}" for i in range(2) for _, c in PAIRS.values()])
    smooth(outlier_model, tiny_tokens, alpha, CTX)
    for i in range(2):
        before, after = original.model.layers[i], outlier_model.model.layers[i]
        for norm_name, consumers in PAIRS.values():
            w_max = torch.cat([before.get_submodule(c).weight for c in consumers]).abs().amax(0)
            expected = act[f"model.layers.{i}.{consumers[0]}"] ** alpha / w_max ** (1 - alpha)
            s = before.get_submodule(norm_name).weight / after.get_submodule(norm_name).weight
            torch.testing.assert_close(s, expected, rtol=1e-5, atol=0)
            for c in consumers:
                scaled = before.get_submodule(c).weight * expected
                torch.testing.assert_close(after.get_submodule(c).weight, scaled, rtol=1e-5, atol=1e-7)
        # o_proj and down_proj have no norm in front of them: untouched.
        for c in ("self_attn.o_proj", "mlp.down_proj"):
            assert torch.equal(after.get_submodule(c).weight, before.get_submodule(c).weight)


def test_alpha_extremes(outlier_model, tiny_tokens):
    """alpha=1 makes every smoothed activation channel's max 1; alpha=0 makes every weight column's max 1."""
    flat_act = copy.deepcopy(outlier_model)
    smooth(flat_act, tiny_tokens, 1.0, CTX)
    for name, x_max in channel_abs_max(flat_act, tiny_tokens, smoothed_inputs(flat_act)).items():
        torch.testing.assert_close(x_max, torch.ones_like(x_max), rtol=1e-4, atol=0, msg=name)
    smooth(outlier_model, tiny_tokens, 0.0, CTX)
    for layer in outlier_model.model.layers:
        for _, consumers in PAIRS.values():
            w_max = torch.cat([layer.get_submodule(c).weight for c in consumers]).abs().amax(0)
            torch.testing.assert_close(w_max, torch.ones_like(w_max), rtol=1e-5, atol=0)


def test_smoothing_flattens_activations(outlier_model, tiny_tokens):
    names = smoothed_inputs(outlier_model)
    before = channel_abs_max(outlier_model, tiny_tokens, names)
    stats = smooth(outlier_model, tiny_tokens, 0.5, CTX)
    after = channel_abs_max(outlier_model, tiny_tokens, names)
    for name in names:
        assert ratio(after[name]) < 0.5 * ratio(before[name]), name
    # The reported summary agrees with the independent measurement.
    attn_before = [ratio(before[n]) for n in names if "q_proj" in n]
    assert stats["act_max_over_median"]["attn_in"]["before"] == pytest.approx(sum(attn_before) / len(attn_before), rel=1e-4)
    attn_after = [ratio(after[n]) for n in names if "q_proj" in n]
    assert stats["act_max_over_median"]["attn_in"]["after"] == pytest.approx(sum(attn_after) / len(attn_after), rel=1e-3)


@pytest.mark.parametrize("spec", [BitSpec.parse("W8A8"), BitSpec.parse("W4A4"), BitSpec.parse("W4A16"),
                                  BitSpec.parse("W8A8", a_symmetric=True, w_symmetric=True)], ids=str)
def test_quantize_leaves_every_linear_quantized_at_the_spec(outlier_model, tiny_tokens, spec):
    result = get_method("smoothquant").from_options({}).quantize(outlier_model, spec, tiny_tokens, CTX)
    assert_quantized(result.model, spec, 7 * 2)
    assert result.stats["alpha"] == 0.5 and result.stats["quantized_linears"] == 14


# --- smollm2-135m ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_smoothed(_smollm2_loaded, brown_calib):
    """(reference, smoothed, stats): smollm2 smoothed once with alpha 0.5 on the 16x256 Brown calibration."""
    reference = _smollm2_loaded.model
    smoothed = copy.deepcopy(reference)
    stats = smooth(smoothed, brown_calib, 0.5, CTX)
    return reference, smoothed, stats


@pytest.mark.smollm2
def test_smollm2_smoothing_keeps_logits_and_flattens(smollm2_smoothed, brown_eval):
    reference, smoothed, stats = smollm2_smoothed
    tokens = brown_eval[:2]  # held-out text, not the calibration windows
    names = smoothed_inputs(reference)
    before = channel_abs_max(reference, tokens, names)
    after = channel_abs_max(smoothed, tokens, names)
    with torch.no_grad():
        expected = reference(tokens, use_cache=False).logits
        got = smoothed(tokens, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    for pair in ("self_attn.q_proj", "mlp.gate_proj"):
        r_before = [ratio(before[n]) for n in names if n.endswith(pair)]
        r_after = [ratio(after[n]) for n in names if n.endswith(pair)]
        # Flatter on average over the 30 layers, and in most single layers.
        assert sum(r_after) < 0.5 * sum(r_before), pair
        assert sum(a < b for a, b in zip(r_after, r_before)) >= 0.9 * len(r_before), pair
    assert stats["act_max_over_median"]["mlp_in"]["after"] < stats["act_max_over_median"]["mlp_in"]["before"]


def _quantized_ppl(model: nn.Module, spec: BitSpec, windows: torch.Tensor) -> float:
    from harness import freeze, quantize_linears

    model = copy.deepcopy(model)
    quantize_linears(model, spec)
    freeze(model)
    return perplexity(model, windows, device=CPU, progress=False)


@pytest.mark.smollm2
def test_smollm2_perplexity_vs_fp_and_rtn(smollm2_smoothed, brown_eval, fp_ppl, w4a4_ppl):
    """W8A8 within 1% of FP; at W6A6 and W4A4 better than RTN (default asymmetric bit specs).

    FP and RTN W4A4 come from the session cache (tests/methods/conftest.py).
    """
    reference, smoothed, _ = smollm2_smoothed
    w8a8 = _quantized_ppl(smoothed, BitSpec.parse("W8A8"), brown_eval)
    assert w8a8 < 1.01 * fp_ppl, (w8a8, fp_ppl)
    rtn = {"W6A6": _quantized_ppl(reference, BitSpec.parse("W6A6"), brown_eval), "W4A4": w4a4_ppl("rtn")}
    for text, rtn_ppl in rtn.items():
        sq = _quantized_ppl(smoothed, BitSpec.parse(text), brown_eval)
        assert sq < rtn_ppl, (text, sq, rtn_ppl)
