"""Every family's adapter, on a tiny random model of that family: running the blocks one by one is the model's
own forward (sliding windows shorter than the sequence, Gemma's two RoPEs, eager and SDPA kernels), and each
equivalent transform leaves the FP output equal (float64 models, so the tolerance is tight).
"""
from __future__ import annotations

import pytest
import torch

from harness.adapter import ADAPTERS, get_adapter
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
        p = getattr(adapter, pair)
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
