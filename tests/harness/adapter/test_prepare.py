"""``LlamaAdapter.prepare`` and ``harness.adapter.fused``: a family's fused projections (Phi-3) and stacked experts
(Qwen3-MoE) as separate linears compute the transformers model's own logits, every name the adapter gives is one
linear, an expert's linears see exactly the tokens the router sends it, and the state converts to and from the
checkpoint layout (a lazily loaded folder equals the eager model)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.adapter import PREPARED_MODULES, checkpoint_state, get_adapter, prepared_state
from harness.adapter.fused import Router
from harness.models import TINY_FAMILY_CONFIGS, load_model, tiny_model

PREPARED = ["phi3", "qwen3_moe"]  # the tiny families whose prepare changes the model


def tokens(n: int = 2, seqlen: int = 40) -> torch.Tensor:
    return torch.randint(0, 49152, (n, seqlen), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_exactly_the_families_that_fuse_or_stack_are_changed():
    changed = {f for f in TINY_FAMILY_CONFIGS if any(isinstance(m, PREPARED_MODULES) for m in tiny_model(f).modules())}
    assert changed == set(PREPARED)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("family", PREPARED)
def test_the_prepared_model_computes_the_transformers_models_logits(family, kernel, dtype):
    original = tiny_model(family, seed=1, attention_kernel=kernel, prepare=False).to(dtype)
    if dtype == torch.float64:
        original.config._experts_implementation = "eager"  # transformers' grouped_mm takes no float64
    ids = tokens()
    expected = logits(original, ids)
    prepared = get_adapter(original).prepare(original)
    assert any(isinstance(m, PREPARED_MODULES) for m in prepared.modules())
    tight = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(logits(prepared, ids), expected, rtol=tight, atol=tight)


@pytest.mark.parametrize("family", PREPARED)
def test_names_are_separate_linears_and_preparing_twice_changes_nothing(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    for name in adapter.linear_names:
        assert type(layer.get_submodule(name)) is nn.Linear, name
    for name in adapter.routers:
        assert isinstance(layer.get_submodule(name), Router) and name not in adapter.linear_names
    for pair in adapter.scale_pairs:
        assert all(hasattr(layer.get_submodule(name), "weight") for name in (pair.producer, *pair.consumers))
    modules = dict(model.named_modules())
    adapter.prepare(model)
    assert all(modules[name] is module for name, module in model.named_modules())


def test_an_experts_linears_see_exactly_the_tokens_routed_to_it():
    """The router's top-2 of softmax(x W^T), computed here from its weight, against what each expert's gate_proj and
    down_proj are called with: that sequence's routed tokens only, one (1, tokens, width) call per sequence."""
    model = tiny_model("qwen3_moe", seed=1).double()
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    x = torch.randn(3, 20, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.get_submodule(f"mlp.experts.{e}.gate_proj").register_forward_pre_hook(
        lambda _m, args, e=e: seen.setdefault(e, []).append(args[0])) for e in range(adapter.experts)]
    with torch.no_grad():
        layer.get_submodule(adapter.mlp_path)(x)
    for hook in hooks:
        hook.remove()
    weight = layer.get_submodule(adapter.routers[0]).weight
    chosen = (x @ weight.T).topk(model.config.num_experts_per_tok, dim=-1).indices  # softmax keeps the order
    for e in range(adapter.experts):
        expected = [x[row][(chosen[row] == e).any(-1)].unsqueeze(0) for row in range(len(x))]
        expected = [t for t in expected if t.shape[1]]
        assert len(seen.get(e, [])) == len(expected)
        for got, want in zip(seen.get(e, []), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("family", PREPARED)
def test_the_state_converts_to_and_from_the_checkpoint_layout(family, tmp_path):
    from safetensors.torch import load_file

    original = tiny_model(family, seed=1, prepare=False)
    original.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")  # fused q/k/v and gate/up (Phi-3), a linear per expert (Qwen3-MoE)
    prepared = get_adapter(original).prepare(tiny_model(family, seed=1, prepare=False))
    state = prepared.state_dict()
    for source in (original.state_dict(), saved):  # in memory (stacked experts) and on disk; the tied head not saved
        converted = prepared_state(prepared, source)
        assert set(converted) | {"lm_head.weight"} == set(state)
        assert all(torch.equal(value, state[key]) for key, value in converted.items())
    back = checkpoint_state(prepared, prepared_state(prepared, saved))
    assert set(back) == set(saved) and all(torch.equal(back[key], saved[key]) for key in saved)


@pytest.mark.parametrize("family", PREPARED)
def test_a_lazily_loaded_checkpoint_equals_the_model(family, tmp_path, smollm2_tokenizer):
    original = tiny_model(family, seed=1, prepare=False, tie_word_embeddings=False)
    original.save_pretrained(tmp_path, max_shard_size="1MB")
    smollm2_tokenizer.save_pretrained(tmp_path)
    from harness.models.lazy import materialize_all

    lazy = load_model(str(tmp_path), dtype="float32", device="cpu", lazy=True).model
    eager = load_model(str(tmp_path), dtype="float32", device="cpu").model
    ids = tokens(1, 24)
    expected = logits(original, ids)
    torch.testing.assert_close(logits(eager, ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(materialize_all(lazy), ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", PREPARED)
def test_a_model_built_elsewhere_is_prepared_when_a_method_applies(family):
    """``Method.apply`` (every route: the API, a sweep) prepares a transformers model it is handed, in place."""
    import ptqbench

    built, loaded = tiny_model(family, seed=1, prepare=False), tiny_model(family, seed=1)
    for model in (built, loaded):
        ptqbench.quantize(model, "rtn", "W4A16", None, device="cpu", progress=False)
    assert any(isinstance(m, PREPARED_MODULES) for m in built.modules())
    ids = tokens()
    assert torch.equal(logits(built, ids), logits(loaded, ids))
