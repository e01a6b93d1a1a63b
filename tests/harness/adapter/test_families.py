"""Every family's adapter, on a tiny random model of that family: running the blocks one by one is the model's
own forward (sliding windows shorter than the sequence, Gemma's two RoPEs, eager and SDPA kernels), and each
equivalent transform leaves the FP output equal (float64 models, so the tolerance is tight).
"""
from __future__ import annotations

import pytest
import torch

from harness.adapter import ADAPTERS, get_adapter
from harness.errors import ConfigError
from harness.models import TINY_FAMILY_CONFIGS, tiny_model

FAMILIES = sorted(TINY_FAMILY_CONFIGS)
SEQLEN = 40  # longer than the tiny models' sliding window (16)


def tokens(n: int = 2) -> torch.Tensor:
    return torch.randint(0, 49152, (n, SEQLEN), generator=torch.Generator().manual_seed(0))


def blockwise_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    adapter = get_adapter(model)
    with torch.no_grad():
        hidden = adapter.embed(model)(ids)
        pos = adapter.position_embeddings(model, hidden)
        for layer in adapter.layers(model):
            hidden = adapter.run_layer(layer, hidden, pos)
        return adapter.lm_head(model)(adapter.final_norm(model)(hidden))


def tolerance(family: str) -> dict:
    # Gemma's norms compute in float32 whatever the model's dtype (x.float() * (1 + w.float())): float32 rounding
    return {"rtol": 1e-5, "atol": 1e-6} if family == "gemma3_text" else {"rtol": 1e-9, "atol": 1e-9}


def model64(family: str, **kw) -> torch.nn.Module:
    return tiny_model(family, seed=1, **kw).double()


def with_nontrivial_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights away from their init (ones, or Gemma's zeros), so folding them is tested, not a no-op."""
    g = torch.Generator().manual_seed(2)
    for name, module in model.named_modules():
        if name.endswith("norm") or name.endswith("layernorm"):
            module.weight.data = module.weight.data + 0.5 * torch.rand(module.weight.shape, generator=g, dtype=module.weight.dtype)
    return model


def test_every_tiny_family_has_an_adapter():
    assert set(FAMILIES) <= set(ADAPTERS)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_running_the_blocks_one_by_one_is_the_models_forward(family, kernel):
    model = model64(family, attention_kernel=kernel)
    ids = tokens()
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(blockwise_logits(model, ids), expected, rtol=1e-10, atol=1e-10)


def test_a_window_shorter_than_the_sequence_changes_the_output():
    # the check above could pass by ignoring windows altogether: without the window the logits differ
    model = model64("mistral")
    ids = tokens()
    windowed = blockwise_logits(model, ids)
    model.config.sliding_window = None
    assert not torch.allclose(blockwise_logits(model, ids), windowed)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pair", ["attn_in", "mlp_in", "mlp_out"])
def test_fold_scale_leaves_the_output_equal(family, pair):
    model = with_nontrivial_norms(model64(family))
    adapter = get_adapter(model)
    ids = tokens()
    before = blockwise_logits(model, ids)
    g = torch.Generator().manual_seed(3)
    for layer in adapter.layers(model):
        for p in adapter.mlp_outs if pair == "mlp_out" else (getattr(adapter, pair),):  # one per expert of a MoE
            width = layer.get_submodule(p.consumers[0]).in_features
            adapter.fold_scale(layer, p, 0.5 + torch.rand(width, generator=g, dtype=torch.float64))
    after = blockwise_logits(model, ids)
    torch.testing.assert_close(after, before, **tolerance(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_norm_leaves_the_output_equal_and_the_norm_plain(family):
    model = with_nontrivial_norms(model64(family))
    adapter = get_adapter(model)
    ids = tokens()
    before = blockwise_logits(model, ids)
    for layer in adapter.layers(model):
        for pair in (adapter.attn_in, adapter.mlp_in):
            adapter.fold_norm(layer, pair)
            torch.testing.assert_close(adapter.norm_scale(layer.get_submodule(pair.producer)),
                                       torch.ones(layer.get_submodule(pair.consumers[0]).in_features, dtype=torch.float64))
    torch.testing.assert_close(blockwise_logits(model, ids), before, **tolerance(family))


def test_rotating_a_biased_linear_rotates_its_output_and_bias():
    linear = torch.nn.Linear(8, 6, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    q_in = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    q_out = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    expected = linear(x) @ q_out
    adapter = get_adapter({"model_type": "qwen2"})
    adapter.rotate_input(linear, q_in)
    adapter.rotate_output(linear, q_out)
    torch.testing.assert_close(linear(x @ q_in), expected)


def test_gemma_norms_multiply_by_one_plus_their_weight():
    model = with_nontrivial_norms(model64("gemma3_text"))
    adapter = get_adapter(model)
    norm = adapter.layers(model)[0].input_layernorm
    x = torch.randn(3, 64, dtype=torch.float64)
    normalised = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm(x), normalised * adapter.norm_scale(norm))
    assert adapter.refusal("rotate_residual") and "post" in adapter.refusal("rotate_residual")


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_context_is_what_the_attention_feeds_o_proj(family):
    """From q/k/v projections alone (as a search over candidate weights computes them): the family's Q/K norms, the
    layer's RoPE and window, Gemma's query_pre_attn_scalar, grouped-query heads."""
    model = with_nontrivial_norms(model64(family))
    adapter = get_adapter(model)
    hidden = adapter.embed(model)(tokens())
    pos = adapter.position_embeddings(model, hidden)
    for layer in adapter.layers(model):  # a sliding-window layer and a full one where the family has both
        normed = layer.get_submodule(adapter.attn_in.producer)(hidden)
        seen = []
        o_proj = layer.get_submodule(adapter.attn_out.consumers[0])
        handle = o_proj.register_forward_pre_hook(lambda _module, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            adapter.run_attention(layer, normed, pos)
            q, k, v = (layer.get_submodule(name)(normed) for name in adapter.qkv_names)
            context = adapter.attention_context(layer, q, k, v, pos)
        handle.remove()
        torch.testing.assert_close(context, seen[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_differentiable_scalings_are_the_folds(family):
    """scaled_norm_weight / scaled_weight (what a learned transform parametrizes) give the weights fold_scale leaves."""
    model = with_nontrivial_norms(model64(family))
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    pair = adapter.attn_in
    s = 0.5 + torch.rand(layer.get_submodule(pair.consumers[0]).in_features, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)
    norm, q = layer.get_submodule(pair.producer), layer.get_submodule(pair.consumers[0])
    expected_norm = adapter.scaled_norm_weight(norm.weight.detach(), 1 / s)
    expected_q = adapter.scaled_weight(q.weight.detach(), None, s)
    adapter.fold_scale(layer, pair, s)
    torch.testing.assert_close(norm.weight.detach(), expected_norm)
    torch.testing.assert_close(q.weight.detach(), expected_q)


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_shift_leaves_the_output_equal(family):
    """v_proj -> o_proj without grouped-query attention: softmax rows sum to one, so the context shifts by what v does."""
    model = model64(family, num_key_value_heads=4)
    adapter = get_adapter(model)
    ids = tokens()
    before = blockwise_logits(model, ids)
    g = torch.Generator().manual_seed(4)
    for layer in adapter.layers(model):
        v = layer.get_submodule(adapter.attn_out.producer)
        adapter.fold_shift(layer, adapter.attn_out, torch.randn(v.out_features, generator=g, dtype=torch.float64))
        assert v.bias is not None
    torch.testing.assert_close(blockwise_logits(model, ids), before, **tolerance(family))


def test_a_norm_without_a_bias_takes_no_shift_and_only_rms_norms_fold():
    model = model64("llama")
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    with pytest.raises(ConfigError, match=r"^model: the llama module input_layernorm \(LlamaRMSNorm\) has no bias"):
        adapter.fold_shift(layer, adapter.attn_in, torch.zeros(64, dtype=torch.float64))
    assert adapter.norm_foldable(layer.input_layernorm)
    assert not adapter.norm_foldable(torch.nn.LayerNorm(64))


@pytest.mark.parametrize("family", FAMILIES)
def test_refusals_follow_the_layout(family):
    adapter = get_adapter(model64(family))
    assert (adapter.refusal("rotate_residual") is not None) == bool(adapter.post_norms)
    assert (adapter.refusal("transform_qk") is not None) == bool(adapter.qk_norms)
    assert (adapter.refusal("mlp_site") is not None) == bool(adapter.routers)
    assert {family for family in FAMILIES if get_adapter({"model_type": family}).qk_norms} == {"qwen3", "gemma3_text", "qwen3_moe"}
    assert {family for family in FAMILIES if get_adapter({"model_type": family}).routers} == {"qwen3_moe"}
    assert adapter.refusal("fold_norm") is None
