"""The qllm method (methods/qllm/method.py): config, end-to-end tiny runs (every ablation option), smollm2 vs RTN."""
from __future__ import annotations

import copy

import pytest
import torch

import methods.qllm.method
from harness import BitSpec, ConfigError, LlamaAdapter, QuantContext, get_method, quant_linears
from harness.engine.calibration_stats import channel_abs_max as channel_max
from harness.quant.quantizer import quantize_weight
from methods.qllm import QLLMConfig
from methods.qllm.method import site_function
from methods.qllm.reassembly import make_plan, site_error, theta_grid
from tests.methods.quantized import assert_quantized
from tests.methods.test_omniquant import _spy_train
from tests.methods.test_qllm_reassembly import site_features, with_outliers

W4A4 = BitSpec.parse("W4A4")


@pytest.mark.parametrize("options, field", [
    ({"assembly": True, "disassembly": False}, "assembly"),
    ({"theta": "fixed"}, "theta_value"),
    ({"theta_value": 2.0}, "theta_value"),
    ({"theta": "sometimes"}, "theta"),
    ({"channel_ratio": 0}, "channel_ratio"),
    ({"rank": 0}, "rank"),
    ({"epochs": -1}, "epochs"),
    ({"final_norm": "bias"}, "final_norm"),
    ({"ranks": 4}, "ranks"),
    ({"search_order": "proxy"}, "search_order"),
    ({"theta": "ratio", "search_order": "official"}, "search_order"),
    ({"noop_candidate": "no"}, "noop_candidate"),
    ({"theta": "fixed", "theta_value": 2.0, "noop_candidate": False}, "noop_candidate"),
    ({"shuffle": 0}, "shuffle"),
    ({"zero_point_grad": "round"}, "zero_point_grad"),
    ({"low_memory": "yes"}, "low_memory"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        QLLMConfig.from_dict(options)


def test_config_round_trips():
    cfg = QLLMConfig(theta="fixed", theta_value=3.0, rank=8, final_norm="off")
    assert QLLMConfig.from_dict(cfg.to_dict()) == cfg
    official = QLLMConfig(search_order="official", noop_candidate=False, shuffle=False, zero_point_grad="none")
    assert QLLMConfig.from_dict(official.to_dict()) == official


BASE = {"epochs": 2, "blocks_per_job": 2, "rank": 2, "grid_steps": 10}


def run_qllm(tiny_model, tokens, spec: BitSpec = W4A4, **options):
    """(FP copy, quantized model, result) of the tiny model with LLaMA-like outliers."""
    model = with_outliers(tiny_model)
    original = copy.deepcopy(model)
    result = get_method("qllm").from_options({**BASE, **options}).quantize(model, spec, tokens, QuantContext(progress=False))
    return original, model, result


def block0_features(original, tokens):
    """FP features of block 0's sites and the position embeddings, computed with the tests' own hooks."""
    with torch.no_grad():
        hidden = original.model.embed_tokens(tokens)
    pe = LlamaAdapter().position_embeddings(original, hidden)
    return site_features(original.model.layers[0], hidden, pe), pe


def recompute_block0(original, tokens, sites, spec, samples=1, assembly=True):
    """Per block-0 site: (error with nothing reassembled, error of the recorded theta's plan, best error on the grid).

    The errors are recomputed on the FP block from the recorded theta with ``make_plan`` and
    ``site_error``; the statistic uses every calibration sample, the scoring the first ``samples``.
    """
    feats, pe = block0_features(original, tokens)
    layer = original.model.layers[0]
    out = []
    with torch.no_grad():
        for s in sites[:3]:
            x_max = channel_max(feats[s["site"]])
            x = feats[s["site"]][:samples]
            tokens2d = x.reshape(-1, x.shape[-1])
            consumers, fn = site_function(layer, s["site"], pe)
            weights = [layer.get_submodule(c).weight for c in consumers]
            reference = fn(x, weights)
            before = site_error(fn, x, weights, reference, None, spec)
            plan = make_plan(x_max, s["theta"], tokens2d, torch.cat(weights), assembly) if s["added"] else None
            after = site_error(fn, x, weights, reference, plan, spec) if plan is not None else before
            grid = [make_plan(x_max, t, tokens2d, torch.cat(weights), assembly) for t in theta_grid(x_max, 0.2, BASE["grid_steps"])[1:]]
            best = min([before] + [site_error(fn, x, weights, reference, p, spec) for p in grid if p is not None and p.added])
            out.append((before, after, best))
    return out


def norm_weight(layer, path: str) -> torch.Tensor:
    norm = layer.get_submodule(path)
    return getattr(norm, "module", norm).weight  # a reassembled site wraps its norm


def norms_changed(original, model) -> list[bool]:
    return [not torch.equal(norm_weight(a, p), norm_weight(b, p)) for a, b in zip(original.model.layers, model.model.layers)
            for p in ("input_layernorm", "post_attention_layernorm")]


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n.replace(".module", ""): m.weight for n, m in quant_linears(model)}


def test_tiny_end_to_end(tiny_model, tiny_tokens):
    original, model, result = run_qllm(tiny_model, tiny_tokens)
    widths = {n: m.in_features for n, m in original.named_modules() if isinstance(m, torch.nn.Linear)}
    feats, _ = block0_features(original, tiny_tokens)
    assert_quantized(model, W4A4, 14)
    for name, linear in quant_linears(model):
        assert linear.in_features == linear.weight.shape[1] == widths[name.replace(".module", "")]
    sites = result.stats["jobs"][0]["sites"]
    assert len(sites) == 6 and all(s["candidates"] > 0 for s in sites)
    for s in sites[:3]:  # block 0: the statistic comes from the FP pass, not the quantized one
        assert s["layer"] == 0 and s["max_stat"] == pytest.approx(channel_max(feats[s["site"]]).max().item(), rel=1e-5)
    for s, (before, after, best) in zip(sites, recompute_block0(original, tiny_tokens, sites, W4A4)):
        # the recorded errors are those of the recorded theta's plan, and it is the grid's best
        assert s["error_before"] == pytest.approx(before, rel=1e-4) and s["error_after"] == pytest.approx(after, rel=1e-4)
        assert s["error_after"] == pytest.approx(best, rel=1e-4)
    # a plan is applied only when it lowers the site's error
    assert all(s["error_after"] < s["error_before"] if s["added"] else s["error_after"] == s["error_before"] for s in sites)
    assert result.stats["reassembled_sites"] > 0  # the planted outliers get reassembled
    assert "loss" in result.stats["jobs"][0] and "final_norm_loss" in result.stats
    assert model.lm_head.bias is not None  # the tuned final-norm bias, folded into the FP head
    assert not torch.equal(model.model.norm.weight, original.model.norm.weight)
    assert all(norms_changed(original, model))  # train_norms: the blocks' RMSNorm weights are trained
    # error correction moved the weights off plain RTN (o_proj is never reassembled, so compare it directly)
    o_proj = "model.layers.0.self_attn.o_proj"
    assert not torch.equal(linear_weights(model)[o_proj], quantize_weight(original.get_submodule(o_proj).weight, W4A4))
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged: no extra parameters
    with torch.no_grad():
        assert torch.isfinite(model(tiny_tokens).logits).all()


@pytest.mark.parametrize("text", ["W8A8", "W4A16", "W4A4sym"])
def test_quantizers_follow_the_spec(tiny_model, tiny_tokens, text):
    spec = BitSpec.parse("W4A4", a_symmetric=True, w_symmetric=True) if text == "W4A4sym" else BitSpec.parse(text)
    _, model, _ = run_qllm(tiny_model, tiny_tokens, spec, epochs=1)
    assert_quantized(model, spec, 14)


# --- ablations: each option does what it says, checked by what it must change or leave alone ---------


def check_theta_ratio(original, model, result, tokens):
    feats, _ = block0_features(original, tokens)
    sites = result.stats["jobs"][0]["sites"]
    assert all(s["candidates"] == 1 for s in sites)  # no search: one theta per site
    for s in sites[:3]:
        x_max = channel_max(feats[s["site"]])
        width, budget = x_max.numel(), int(x_max.numel() * 0.2)
        hi, lo = float(x_max.max()), float(x_max.min())
        downward = [hi - k * (hi - lo) / BASE["grid_steps"] for k in range(BASE["grid_steps"])]
        added = [int(torch.ceil(x_max / t).clamp(min=1).sum()) - width for t in downward]
        # the official non-adaptive choice: the most channels the budget allows on the downward grid
        assert s["added"] == max(a for a in added if a <= budget)
    assert result.stats["reassembled_sites"] > 0


def check_no_assembly(original, model, result, tokens):
    widths = {n: m.in_features for n, m in original.named_modules() if isinstance(m, torch.nn.Linear)}
    adapter, grown = LlamaAdapter(), 0
    for s in (s for j in result.stats["jobs"] for s in j["sites"]):
        assert s["merged"] == 0
        for path in getattr(adapter, s["site"]).consumers:
            name = f"model.layers.{s['layer']}.{path}"
            assert linear_weights(model)[name].shape[1] == widths[name] + s["added"]
            grown += s["added"] > 0
    assert grown > 0  # disassembly alone widens the consumers of a reassembled site


def check_no_error_correction(original, model, result, tokens):
    assert not any("loss" in j or "loss_first" in j for j in result.stats["jobs"])
    assert not any(norms_changed(original, model))  # nothing trains the norms either
    reassembled = {f"model.layers.{s['layer']}.{c}" for j in result.stats["jobs"] for s in j["sites"] if s["added"]
                   for c in getattr(LlamaAdapter(), s["site"]).consumers}
    plain = {n: w for n, w in linear_weights(model).items() if n not in reassembled}
    assert len(plain) >= 2  # at least o_proj of each block (never a reassembly site)
    for name, weight in plain.items():  # without correction a linear is plain RTN of its FP weight
        torch.testing.assert_close(weight, quantize_weight(original.get_submodule(name).weight, W4A4), msg=name)


def check_final_norm_off(original, model, result, tokens):
    assert model.lm_head.bias is None and "final_norm_loss" not in result.stats
    assert torch.equal(model.model.norm.weight, original.model.norm.weight)
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)


def check_final_norm_weight(original, model, result, tokens):
    assert model.lm_head.bias is None and "final_norm_loss" in result.stats
    assert not torch.equal(model.model.norm.weight, original.model.norm.weight)


def check_frozen_norms(original, model, result, tokens):
    assert "loss" in result.stats["jobs"][0]  # error correction still ran ...
    assert not any(norms_changed(original, model))  # ... without touching the blocks' norms


def check_two_search_samples(original, model, result, tokens):
    sites = result.stats["jobs"][0]["sites"]
    two = recompute_block0(original, tokens, sites, W4A4, samples=2)
    one = recompute_block0(original, tokens, sites, W4A4, samples=1)
    for s, (before, after, _), (before1, _, _) in zip(sites, two, one):
        # the recorded errors are scored on two samples' features, which differ from one sample's
        assert s["error_before"] == pytest.approx(before, rel=1e-4) and s["error_after"] == pytest.approx(after, rel=1e-4)
        assert s["error_before"] != pytest.approx(before1, rel=1e-3)


def check_official_search_order(original, model, result, tokens):
    sites = result.stats["jobs"][0]["sites"]
    for s, (_, after, _) in zip(sites, recompute_block0(original, tokens, sites, W4A4)):
        # applied: the recorded theta's disassemble-first plan, whatever its proxy scored
        assert s["error_after"] == pytest.approx(after, rel=1e-4) and "error_scored" in s
    assert any(s["error_scored"] != pytest.approx(s["error_after"], rel=1e-3) for s in sites)


ABLATIONS = {
    "theta_ratio": ({"theta": "ratio"}, check_theta_ratio),
    "no_assembly": ({"assembly": False}, check_no_assembly),
    "no_error_correction": ({"error_correction": False}, check_no_error_correction),
    "final_norm_off": ({"final_norm": "off"}, check_final_norm_off),
    "final_norm_weight": ({"final_norm": "weight"}, check_final_norm_weight),
    "frozen_norms": ({"train_norms": False}, check_frozen_norms),
    "two_search_samples": ({"search_samples": 2}, check_two_search_samples),
    "official_search_order": ({"search_order": "official"}, check_official_search_order),
}


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablation_option(tiny_model, tiny_tokens, ablation):
    options, check = ABLATIONS[ablation]
    original, model, result = run_qllm(tiny_model, tiny_tokens, **options)
    assert_quantized(model, W4A4, 14)
    check(original, model, result, tiny_tokens)
    with torch.no_grad():
        assert torch.isfinite(model(tiny_tokens).logits).all()


def test_noop_candidate_false_reassembles_even_where_it_hurts(tiny_model, tiny_tokens):
    """Without outliers no theta helps a site: the default leaves every site alone; the official search
    (no no-op candidate) applies its best candidate anyway."""
    options = {**BASE, "error_correction": False, "final_norm": "off"}
    sites = {}
    for noop in (True, False):
        result = get_method("qllm").from_options({**options, "noop_candidate": noop}).quantize(
            copy.deepcopy(tiny_model), W4A4, tiny_tokens, QuantContext(progress=False))
        sites[noop] = [s for j in result.stats["jobs"] for s in j["sites"]]
    assert all(s["candidates"] > 0 and s["added"] == 0 and s["error_after"] == s["error_before"] for s in sites[True])
    assert all(s["added"] > 0 and s["error_after"] > s["error_before"] for s in sites[False])


@pytest.mark.parametrize("shuffle", [True, False])
def test_shuffle_false_trains_on_the_samples_in_order(monkeypatch, tiny_model, tiny_tokens, shuffle):
    """Both trainings (the corrections of the one job, then the final norm) see the samples in order, or each
    the permutations of its seeded generator."""
    steps = _spy_train(monkeypatch, methods.qllm.method)
    run_qllm(tiny_model, tiny_tokens, shuffle=shuffle)
    n, epochs = len(tiny_tokens), BASE["epochs"]
    seen = [sum(steps[i : i + n], []) for i in range(0, len(steps), n)]
    assert len(seen) == 2 * epochs  # job 0 (blocks 0-1), final norm
    if not shuffle:
        assert seen == [list(range(n))] * (2 * epochs)
    else:  # seed = context seed + job index (0), and the context seed for the final norm: both 0
        gen = torch.Generator().manual_seed(0)
        per_training = [torch.randperm(n, generator=gen).tolist() for _ in range(epochs)]
        assert seen == per_training * 2 and any(e != list(range(n)) for e in seen)


def test_zero_point_grad_none_reaches_every_activation_quantizer(tiny_model, tiny_tokens):
    spec = BitSpec.parse("W4A4", attention=True)
    flags = {}
    for mode in ("ste", "none"):
        _, model, _ = run_qllm(copy.deepcopy(tiny_model), tiny_tokens, spec, epochs=1, zero_point_grad=mode)
        quantizers = [m for m in model.modules() if hasattr(m, "zero_point_grad")]
        assert len(quantizers) >= 2 * (7 + 1)  # per block: each linear's input, Q/K/V
        flags[mode] = {q.zero_point_grad for q in quantizers}
    assert flags == {"ste": {True}, "none": {False}}


@pytest.mark.smollm2
def test_smollm2_w4a4_beats_rtn(w4a4_ppl):
    """Demo settings (coarse theta grid, 1 epoch); the runs are shared via tests/methods/conftest.py."""
    qllm, rtn = w4a4_ppl("qllm"), w4a4_ppl("rtn")
    assert qllm < rtn, f"qllm {qllm:.2f} vs rtn {rtn:.2f}"


def test_low_memory_gives_the_same_model_bit_for_bit(tiny_model, tiny_tokens):
    """Q(W) as codes, dequantized in the forward and again in the backward (low_memory): the same losses
    and the same quantized model as the float cache; no linear is left recomputing after the merge."""
    spec = BitSpec.parse("W4A4", attention=True)
    _, plain, plain_result = run_qllm(copy.deepcopy(tiny_model), tiny_tokens, spec, epochs=2)
    _, low, low_result = run_qllm(copy.deepcopy(tiny_model), tiny_tokens, spec, epochs=2, low_memory=True)
    losses = [(j.get("loss_first"), j.get("loss")) for j in plain_result.stats["jobs"]]
    assert losses == [(j.get("loss_first"), j.get("loss")) for j in low_result.stats["jobs"]] and losses[0][1] is not None
    with torch.no_grad():
        assert torch.equal(plain(tiny_tokens).logits, low(tiny_tokens).logits)
    assert not any(m.recompute_weight for _, m in quant_linears(low))
    assert "low_memory" not in QLLMConfig().to_dict()


def test_low_memory_trains_with_the_weights_out_of_memory(monkeypatch, tiny_model, tiny_tokens):
    model, seen = with_outliers(copy.deepcopy(tiny_model)), []
    real = methods.qllm.method.train

    def spy(*args, **kwargs):
        seen.append([m.weight.is_meta for _, m in quant_linears(model) if m.side is not None])
        return real(*args, **kwargs)

    monkeypatch.setattr(methods.qllm.method, "train", spy)
    get_method("qllm").from_options({**BASE, "low_memory": True}).quantize(model, W4A4, tiny_tokens, QuantContext(progress=False))
    jobs = [flags for flags in seen if flags]  # the final norm's training has no corrections left
    assert len(jobs) == 1 and all(jobs[0])  # the tiny model's 2 blocks are one job
    assert not any(m.weight.is_meta for _, m in quant_linears(model))


def test_on_a_moe_reassembly_is_refused_and_the_error_correction_alone_trains_every_expert(tiny_tokens):
    """Channel reassembly scores one dense gated MLP's sites: refused on qwen3_moe in one line naming it. Without it the
    low-rank corrections train on every expert's linears (those a calibration token reaches move) and merge."""
    from harness.models import tiny_model

    model = tiny_model("qwen3_moe", seed=0)
    with pytest.raises(ConfigError, match=r"^model: qllm's channel reassembly cannot run on qwen3_moe: its router") as err:
        get_method("qllm").from_options({}).apply(model, W4A4, tiny_tokens, QuantContext(progress=False))
    assert "\n" not in str(err.value)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = {"disassembly": False, "assembly": False, "epochs": 1, "final_norm": "off"}
    get_method("qllm").from_options(options).apply(model, W4A4, tiny_tokens, QuantContext(progress=False))
    experts = {n: q for n, q in quant_linears(model) if ".experts." in n}
    assert len(experts) == 2 * 4 * 3  # 2 blocks x 4 experts x gate/up/down
    assert all(q.side is None and q.frozen for q in experts.values())  # corrections merged, weights frozen
    assert any(not torch.equal(q.weight, quantize_weight(before[f"{n}.weight"], W4A4)) for n, q in experts.items())
