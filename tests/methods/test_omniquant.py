"""OmniQuant-style method: LET is an exact equivalence (GQA included), LWC, training, export, perplexity."""
from __future__ import annotations


import pytest
import torch
from torch.nn.utils import parametrize

from harness import BitSpec, ConfigError, QuantContext, QuantLinear, get_adapter, get_method, quantize_weight, quantizers_disabled
from harness.blockwise import run_blockwise
from harness.models import tiny_llama
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
    rtn_stats = run_blockwise(outlier_model(), tokens, _rtn, device=CPU, progress=False)
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
    assert stats["samples"] == len(tiny_tokens)
    torch.save(model.state_dict(), "/dev/null")  # no parametrization objects left to pickle


@pytest.mark.parametrize("options, field", [
    ({"epochs": -1}, "epochs"), ({"lwc_lr": 0}, "lwc_lr"), ({"let_lr": -1e-3}, "let_lr"),
    ({"alpha": 1.5}, "alpha"), ({"batch_size": 0}, "batch_size"), ({"max_samples": 0}, "max_samples"),
    ({"let_attention": "drop"}, "let_attention"), ({"aug_loss": "yes"}, "aug_loss"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        get_method("omniquant").from_options(options)


def test_config_round_trips():
    cfg = OmniQuantConfig(epochs=2, alpha=0.75, let_lr=1e-3)
    assert OmniQuantConfig.from_dict(cfg.to_dict()) == cfg


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
