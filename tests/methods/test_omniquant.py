"""OmniQuant-style method: LET is an exact equivalence (GQA included), LWC, training, export, perplexity."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.utils import parametrize

import methods.omniquant
from harness import BitSpec, ConfigError, QuantContext, QuantLinear, get_adapter, get_method, quantize_weight, quantizers_disabled
from harness.engine.blockwise import run_blockwise
from harness.engine.hooks import BlockHooks
from harness.engine.blockwise import train as real_train
from harness.models import tiny_llama, tiny_model
from methods.omniquant import LearnableClipQuantizer, OmniQuantConfig, attach, fold

W4A4 = BitSpec.parse("W4A4")
CPU = torch.device("cpu")


def random_scales(state, generator):
    """Non-trivial scales in [0.3, 3], so an equivalence bug cannot hide behind s = 1."""
    with torch.no_grad():
        for p in state.scales.parameters():
            p.copy_(torch.exp(torch.empty_like(p).uniform_(-1.2, 1.2, generator=generator)))


def check_let_is_exact(model, tokens, atol, config=OmniQuantConfig()):
    adapter = get_adapter(model)
    geometry = adapter.attention_geometry(model)
    with torch.no_grad():
        reference = model(tokens).logits
    g = torch.Generator().manual_seed(0)
    states = [attach(layer, W4A4, adapter, geometry, None, config) for layer in adapter.layers(model)]
    for s in states:
        random_scales(s, g)
    with quantizers_disabled(model), torch.no_grad():
        transformed = model(tokens).logits
        # the scales really changed the weights (else the test proves nothing)
        q = states[0].layer.mlp.up_proj
        assert not torch.allclose(q.weight, q.parametrizations.weight.original)
        attention_let = parametrize.is_parametrized(states[0].layer.self_attn.q_proj)
        assert attention_let == (config.let_attention == "exact")
        assert parametrize.is_parametrized(states[0].layer.self_attn.o_proj) == attention_let
        for s in states:
            fold(s)
        folded = model(tokens).logits
    torch.testing.assert_close(transformed, reference, rtol=0, atol=atol)
    torch.testing.assert_close(folded, reference, rtol=0, atol=atol)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("let_attention", ["exact", "off"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_let_apply_and_fold_keep_fp_logits_tiny(tiny_tokens, kv_heads, let_attention):
    model = tiny_llama(seed=0, vocab_size=256, num_key_value_heads=kv_heads)
    check_let_is_exact(model, tiny_tokens, atol=1e-4, config=OmniQuantConfig(let_attention=let_attention))


def test_aug_loss_adds_the_fp_block_on_quantized_inputs(tiny_tokens):
    """Block 0 sees the embeddings in both chains, so there the extra term equals the first: twice the loss."""
    def first_losses(aug):
        options = {"epochs": 1, "max_samples": 1, "aug_loss": aug}
        model = tiny_llama(seed=0, vocab_size=256)
        stats = get_method("omniquant").from_options(options).quantize(model, W4A4, tiny_tokens, QuantContext(progress=False)).stats
        return [b["epoch_losses"][0] for b in stats["blocks"]]

    plain, aug = first_losses(False), first_losses(True)
    assert aug[0] == pytest.approx(2 * plain[0], rel=1e-5)
    assert aug[1] > plain[1] and aug[1] != pytest.approx(2 * plain[1], rel=1e-3)


def test_untied_rope_pairs_would_break_equivalence(tiny_model, tiny_tokens):
    """Why the q/k scale is tied over RoPE pairs: an untied per-channel q/k scale changes the function."""
    attn = tiny_model.model.layers[0].self_attn
    with torch.no_grad():
        reference = tiny_model(tiny_tokens).logits
        s = torch.exp(torch.empty(attn.k_proj.out_features).uniform_(-1, 1, generator=torch.Generator().manual_seed(0)))
        attn.k_proj.weight.mul_(s[:, None])
        attn.q_proj.weight.div_(s.view(2, -1).repeat_interleave(2, dim=0).reshape(-1)[:, None])
        assert not torch.allclose(tiny_model(tiny_tokens).logits, reference, atol=1e-4)


def _let_logits(model, tokens, adapter):
    """The logits with random LET scales (quantizers off), after folding them, and the states."""
    g = torch.Generator().manual_seed(0)
    states = [attach(layer, W4A4, adapter, adapter.attention_geometry(model), None, OmniQuantConfig())
              for layer in adapter.layers(model)]
    for s in states:
        random_scales(s, g)
    with quantizers_disabled(model), torch.no_grad():
        transformed = model(tokens).logits
        for s in states:
            fold(s)
        return transformed, model(tokens).logits, states


@pytest.mark.parametrize("family", ["phi3", "qwen3_moe"])
def test_let_is_exact_with_partial_rope_and_routed_experts(family, tiny_tokens):
    """Phi-3 turns half of each head (the q/k scale ties d with d + rotary/2, the other half free); Qwen3-MoE's
    router reads the scaled MLP input (its columns take the scale) and has no q/k scale (QK-norms)."""
    model = tiny_model(family, seed=0).double()
    adapter = get_adapter(model)
    with torch.no_grad():
        reference = model(tiny_tokens).logits
    transformed, folded, states = _let_logits(model, tiny_tokens, adapter)
    assert states[0].scales is None  # folded
    # the scales are float32 (s and 1 / s round once each): ~1e-7; a wrong tie is off by 1e-2 (below)
    torch.testing.assert_close(transformed, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(folded, reference, rtol=0, atol=1e-6)


def test_a_q_k_scale_tied_as_for_full_rope_breaks_partial_rope(tiny_tokens):
    """Why the tie follows the rotary dimension: with Phi-3's half RoPE, pairs (d, d + head_dim/2) change the function."""
    model = tiny_model("phi3", seed=0).double()
    adapter = get_adapter(model)
    with torch.no_grad():
        reference = model(tiny_tokens).logits
    transformed, _, _ = _let_logits(model, tiny_tokens, dataclasses.replace(adapter, rotary_fraction=1.0))
    assert not torch.allclose(transformed, reference, atol=1e-3)


@pytest.mark.smollm2
def test_let_apply_and_fold_keep_fp_logits_smollm2(smollm2, brown_eval):
    model, _ = smollm2
    check_let_is_exact(model, brown_eval[:1, :64], atol=2e-3)


def test_lwc_quantizer_matches_clipped_minmax():
    spec = BitSpec.parse("W4A16g16")
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    lwc = LearnableClipQuantizer(spec, w, init=4.0)
    assert lwc.gamma.shape == (16, 1)  # 8 rows x 2 groups of 16
    with torch.no_grad():
        lwc.gamma[3] = 1.0
    factor_max = torch.sigmoid(lwc.gamma.detach())
    factor_min = torch.full((16, 1), torch.sigmoid(torch.tensor(4.0)).item())
    # independent computation: shrink each group's range by the factors, then plain min/max RTN
    g = w.reshape(16, 16)
    lo, hi = g.amin(1, keepdim=True) * factor_min, g.amax(1, keepdim=True) * factor_max
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    expected = ((torch.clamp(torch.round(g / scale) + zero, 0, 15) - zero) * scale).reshape(8, 32)
    torch.testing.assert_close(lwc(w), expected)
    lwc.gamma.data.fill_(30.0), lwc.beta.data.fill_(30.0)  # sigmoid(30) == 1: no clipping = RTN
    torch.testing.assert_close(lwc(w), quantize_weight(w, spec))
    lwc(w).sum().backward()
    assert lwc.gamma.grad is not None


def outlier_model():
    """Tiny LLaMA with a few large channels after the norms, like the activation outliers of real LLMs."""
    model = tiny_llama(seed=0, vocab_size=256, hidden_size=64, num_hidden_layers=1)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:3] = 20.0
    return model


def test_training_reduces_block_mse_below_rtn():
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    rtn_stats = run_blockwise(outlier_model(), tokens, BlockHooks(solve=_rtn), device=CPU, progress=False)
    omni = get_method("omniquant").from_options({"epochs": 10})
    init = get_method("omniquant").from_options({"epochs": 0}).quantize(outlier_model(), W4A4, tokens, QuantContext(progress=False))
    result = omni.quantize(outlier_model(), W4A4, tokens, QuantContext(progress=False))
    block = result.stats["blocks"][0]
    assert block["output_mse"] < 0.8 * rtn_stats[0]["output_mse"]
    assert block["output_mse"] < init.stats["blocks"][0]["output_mse"]
    assert block["epoch_losses"][-1] < block["epoch_losses"][0]


def _rtn(job):
    from harness import quantize_block

    for layer in job.layers:
        for q in quantize_block(layer, W4A4, job.adapter).values():
            q.freeze()


def test_export_is_plain_llama_with_frozen_quant_linears(tiny_model, tiny_tokens):
    result = get_method("omniquant").from_options({"epochs": 1}).quantize(tiny_model, W4A4, tiny_tokens, QuantContext(progress=False))
    model = result.model
    assert type(model).__name__ == "LlamaForCausalLM"
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 7 * 2 and all(m.frozen and m.act_quant.enabled for m in linears)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert [type(m.weight) for m in linears] == [torch.nn.Parameter] * 14
    # the stored weights are already on the 4-bit grid: re-quantizing without clipping changes nothing
    w = linears[0].weight.detach()
    assert torch.unique(w[0]).numel() <= 16
    stats = result.stats
    assert len(stats["blocks"]) == 2 and {"init_loss", "epoch_losses", "seconds", "output_mse"} <= stats["blocks"][0].keys()
    assert stats["blocks"][0]["init_loss"] is None  # not asked for (init_loss: false)
    assert stats["samples"] == len(tiny_tokens)
    torch.save(model.state_dict(), "/dev/null")  # no parametrization objects left to pickle


@pytest.mark.parametrize("options, field", [
    ({"epochs": -1}, "epochs"), ({"lwc_lr": 0}, "lwc_lr"), ({"let_lr": -1e-3}, "let_lr"),
    ({"alpha": 1.5}, "alpha"), ({"batch_size": 0}, "batch_size"), ({"max_samples": 0}, "max_samples"),
    ({"let_attention": "drop"}, "let_attention"), ({"aug_loss": "yes"}, "aug_loss"),
    ({"let_init": "signed"}, "let_init"), ({"shuffle": "no"}, "shuffle"), ({"zero_point_grad": "round"}, "zero_point_grad"),
    ({"init_loss": "yes"}, "init_loss"), ({"low_memory": 1}, "low_memory"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        get_method("omniquant").from_options(options)


def test_config_round_trips():
    cfg = OmniQuantConfig(epochs=2, alpha=0.75, let_lr=1e-3)
    assert OmniQuantConfig.from_dict(cfg.to_dict()) == cfg
    official = OmniQuantConfig(let_init="official", shuffle=False, zero_point_grad="none")
    assert OmniQuantConfig.from_dict(official.to_dict()) == official


def _smoothquant_scale(act, w_max, alpha=0.5):
    """The official formula (OmniQuant quantize/omniquant.py L229-231), written out."""
    return (act.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_let_init_official_takes_one_linear_per_pair(kv_heads):
    """let_init: official: q_proj's, up_proj's and o_proj's column max |W| (and max|X| clamped), computed here
    from the weights; pair (default): the max over the pair's consumers, which differs where gate/k/v are larger."""
    model = tiny_llama(seed=0, vocab_size=256, num_key_value_heads=kv_heads)
    adapter, geometry = get_adapter(model), get_adapter(model).attention_geometry(model)
    heads, _, head_dim = geometry
    g = torch.Generator().manual_seed(0)
    act = {"self_attn.q_proj": torch.rand(64, generator=g) * 5, "mlp.gate_proj": torch.rand(64, generator=g) * 5,
           "self_attn.o_proj": torch.rand(heads * head_dim, generator=g) * 5}
    act["self_attn.q_proj"][3] = 0.0  # a dead channel: the official clamp gives 1e-5 ** alpha, not the floor
    layer = model.model.layers[0]
    w = {n: layer.get_submodule(n).weight.detach().clone() for n in ("self_attn.q_proj", "mlp.up_proj", "self_attn.o_proj")}
    official = attach(layer, W4A4, adapter, geometry, act, OmniQuantConfig(let_init="official")).scales
    pair = attach(tiny_llama(seed=0, vocab_size=256, num_key_value_heads=kv_heads).model.layers[0], W4A4, adapter, geometry,
                  act, OmniQuantConfig()).scales
    q_w, up_w = w["self_attn.q_proj"].abs().amax(0), w["mlp.up_proj"].abs().amax(0)
    torch.testing.assert_close(official.qkv.detach(), _smoothquant_scale(act["self_attn.q_proj"], q_w))
    torch.testing.assert_close(official.fc1.detach(), _smoothquant_scale(act["mlp.gate_proj"], up_w))
    o_act, o_w = act["self_attn.o_proj"], w["self_attn.o_proj"].abs().amax(0)
    if kv_heads < heads:  # one scale per KV channel: the max over the query heads that share it (see let_init)
        o_act, o_w = (t.view(kv_heads, heads // kv_heads, head_dim).amax(1).reshape(-1) for t in (o_act, o_w))
    torch.testing.assert_close(official.out.detach(), _smoothquant_scale(o_act, o_w))
    assert not torch.allclose(pair.fc1, official.fc1) and not torch.allclose(pair.qkv, official.qkv)
    assert pair.qkv[3] == 1e-5 and official.qkv[3] > 1e-5


def _spy_train(monkeypatch, module):
    """Record the sample indices of every training step of ``module``'s calls to ``train``."""
    steps = []

    def spy(groups, loss_fn, *args, **kwargs):
        return real_train(groups, lambda idx: steps.append(idx.tolist()) or loss_fn(idx), *args, **kwargs)

    monkeypatch.setattr(module, "train", spy)
    return steps


@pytest.mark.parametrize("shuffle", [True, False])
def test_shuffle_false_trains_on_the_samples_in_order(monkeypatch, tiny_tokens, shuffle):
    steps = _spy_train(monkeypatch, methods.omniquant)
    options = {"epochs": 2, "shuffle": shuffle, "lwc": False}
    get_method("omniquant").from_options(options).quantize(tiny_llama(seed=0, vocab_size=256), W4A4, tiny_tokens,
                                                           QuantContext(progress=False, seed=5))
    n = len(tiny_tokens)
    epochs = [sum(steps[i : i + n], []) for i in range(0, len(steps), n)]
    assert len(epochs) == 2 * 2  # 2 blocks x 2 epochs
    if not shuffle:
        assert epochs == [list(range(n))] * 4
    else:  # the per-block seeded permutations (seed + block index)
        expected = []
        for block in range(2):
            gen = torch.Generator().manual_seed(5 + block)
            expected += [torch.randperm(n, generator=gen).tolist() for _ in range(2)]
        assert epochs == expected and any(e != list(range(n)) for e in epochs)


def test_zero_point_grad_none_changes_gradients_not_values(tiny_tokens):
    """Every quantizer of the block gets the switch; the block computes the same output, and the clipping
    factors' gradients change (weights clipped at sigmoid(4) lie off the grid, where the zero point matters)."""
    spec = BitSpec.parse("W4A4", attention=True)
    results = []
    for mode in ("ste", "none"):
        model = tiny_llama(seed=0, vocab_size=256)
        adapter = get_adapter(model)
        layer = model.model.layers[0]
        state = attach(layer, spec, adapter, adapter.attention_geometry(model), None, OmniQuantConfig(zero_point_grad=mode))
        flags = {q.zero_point_grad for q in layer.modules() if hasattr(q, "zero_point_grad")}
        hidden = model.model.embed_tokens(tiny_tokens).detach()
        out = adapter.run_layer(layer, hidden, adapter.position_embeddings(model, hidden))
        out.pow(2).mean().backward()
        results.append((flags, out.detach(), torch.cat([c.beta.grad.flatten() for c in state.clips])))
    (flags_ste, out_ste, grad_ste), (flags_none, out_none, grad_none) = results
    assert flags_ste == {True} and flags_none == {False}
    assert len([q for q in layer.modules() if hasattr(q, "zero_point_grad")]) == 7 * 2 + 3  # incl. Q, K and V
    assert torch.equal(out_ste, out_none)
    assert not torch.allclose(grad_ste, grad_none)


def test_max_samples_limits_the_calibration(tiny_model, tiny_tokens):
    result = get_method("omniquant").from_options({"epochs": 0, "max_samples": 2}).quantize(
        tiny_model, W4A4, tiny_tokens, QuantContext(progress=False))
    assert result.stats["samples"] == 2


def test_needs_calibration(tiny_model):
    with pytest.raises(ConfigError, match="calibration"):
        get_method("omniquant").from_options({}).quantize(tiny_model, W4A4, None, QuantContext(progress=False))


@pytest.mark.smollm2
def test_smollm2_w4a4_perplexity_below_rtn(w4a4_ppl):
    """Demo settings (1 epoch on 4 calibration windows); the runs are shared via tests/methods/conftest.py."""
    assert w4a4_ppl("omniquant") < w4a4_ppl("rtn")


def test_init_loss_on_request_is_the_untrained_block_error_and_changes_nothing(tiny_model, tiny_tokens):
    import copy

    def run(options):
        return get_method("omniquant").from_options(options).quantize(copy.deepcopy(tiny_model), W4A4, tiny_tokens,
                                                                       QuantContext(progress=False))

    plain, traced, untrained = run({"epochs": 1}), run({"epochs": 1, "init_loss": True}), run({"epochs": 0})
    # block 0's student and FP inputs are both the embeddings, so its loss at the initialisation is the
    # output error of the same block left untrained (epochs 0), up to folding the scales into the weights
    assert traced.stats["blocks"][0]["init_loss"] == pytest.approx(untrained.stats["blocks"][0]["output_mse"], rel=1e-4)
    assert all(b["init_loss"] > 0 for b in traced.stats["blocks"]) and all(b["init_loss"] is None for b in plain.stats["blocks"])
    with torch.no_grad():
        assert torch.equal(plain.model(tiny_tokens).logits, traced.model(tiny_tokens).logits)


@pytest.mark.parametrize("let_attention", ["exact", "off"])
def test_low_memory_gives_the_same_model_bit_for_bit(tiny_model, tiny_tokens, let_attention):
    """Recomputing every weight in the backward (low_memory) trains the same clipping and scales: in the
    "off" mode the attention linears' inputs carry no gradient, only their clipping factors do."""
    import copy

    def run(options):
        options = {"epochs": 2, "let_attention": let_attention, **options}
        return get_method("omniquant").from_options(options).quantize(copy.deepcopy(tiny_model), W4A4, tiny_tokens,
                                                                       QuantContext(progress=False))

    plain, low = run({}), run({"low_memory": True})
    assert [b["epoch_losses"] for b in low.stats["blocks"]] == [b["epoch_losses"] for b in plain.stats["blocks"]]
    with torch.no_grad():
        assert torch.equal(plain.model(tiny_tokens).logits, low.model(tiny_tokens).logits)
    assert OmniQuantConfig(low_memory=True).to_dict()["low_memory"] is True
    assert "low_memory" not in OmniQuantConfig().to_dict()  # earlier runs keep their keys
