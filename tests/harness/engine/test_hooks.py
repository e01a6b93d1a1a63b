"""docs/methods/README.md's examples, executed as printed: each hook does what the page says it does."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from harness import BitSpec, ConfigError, QuantContext, freeze, quantize_linears
from harness.method import WorkingMemory

PAGE = Path(__file__).resolve().parents[3] / "docs" / "methods" / "README.md"
CTX = QuantContext(device=torch.device("cpu"), seed=0, progress=False)
W4A4 = BitSpec.parse("W4A4")


@pytest.fixture(scope="module")
def page() -> dict:
    """The page's python blocks run in order in one namespace, as a plugin module would hold them."""
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.DOTALL):
        exec(compile(block, str(PAGE), "exec"), namespace)  # noqa: S102 (the documented examples exactly as printed)
    return namespace


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_solve_quantizes_as_global_rtn_and_its_stats_reach_the_result(page, tiny_model, tiny_tokens):
    reference = copy.deepcopy(tiny_model)
    quantize_linears(reference, W4A4)
    freeze(reference)
    result = page["BlockRTN"]().apply(tiny_model, W4A4, tiny_tokens, CTX)
    assert [(j["block"], j["linears"]) for j in result.stats["jobs"]] == [(0, 7), (1, 7)]
    assert all(j["output_mse"] > 0 for j in result.stats["jobs"])
    assert torch.equal(logits(tiny_model, tiny_tokens), logits(reference, tiny_tokens))


def test_record_hands_solve_the_fp_inputs_the_teacher_pass_saw(page, tiny_model, tiny_tokens):
    from harness.engine.blockwise import run_blockwise

    plain = run_blockwise(copy.deepcopy(tiny_model), tiny_tokens, page["outlier_hooks"], device=CTX.device, progress=False)
    with torch.no_grad():  # two channels 40x larger at every input_layernorm, as trained LLMs have
        for layer in tiny_model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40.0
    outliers = run_blockwise(tiny_model, tiny_tokens, page["outlier_hooks"], device=CTX.device, progress=False)
    for a, b in zip(plain, outliers):
        assert len(a["q_proj_max_over_median"]) == 1 and b["q_proj_max_over_median"][0] > 5 * a["q_proj_max_over_median"][0]


def last_block_outputs(model, tokens) -> torch.Tensor:
    """What the model's last decoder block outputs (before the final norm), one window at a time."""
    seen = []
    hook = model.model.layers[-1].register_forward_hook(lambda _m, _args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for t in tokens:
            model(t[None])
    hook.remove()
    return torch.cat(seen)


def test_after_keeps_the_last_blocks_outputs_in_the_checkpointed_state(page, tiny_model, tiny_tokens):
    from harness.engine.blockwise import run_blockwise

    fp = last_block_outputs(copy.deepcopy(tiny_model), tiny_tokens)
    hooks = page["LastOutputs"](W4A4, blocks=2)
    run_blockwise(tiny_model, tiny_tokens, hooks, device=CTX.device, progress=False)
    assert set(hooks.state) == {"q", "fp"}
    torch.testing.assert_close(hooks.state["q"], last_block_outputs(tiny_model, tiny_tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooks.state["fp"], fp, rtol=1e-5, atol=1e-5)


def test_before_changes_the_structure_and_no_data_runs_without_a_pass(page, tiny_model, tiny_tokens):
    with torch.no_grad():
        for layer in tiny_model.model.layers:
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    reference = logits(tiny_model, tiny_tokens)
    result = page["FoldedRTN"]().apply(tiny_model, BitSpec.parse("W16A16"), None, CTX)
    assert [j["block"] for j in result.stats["jobs"]] == [0, 1] and "output_mse" not in result.stats["jobs"][0]
    assert all(torch.equal(layer.post_attention_layernorm.weight, torch.ones(64)) for layer in tiny_model.model.layers)
    torch.testing.assert_close(logits(tiny_model, tiny_tokens), reference, rtol=1e-4, atol=1e-5)  # folding is exact


def test_check_model_and_working_memory_read_the_models_config(page, tiny_model, tiny_tokens):
    method = page["PairRTN"]()
    assert method.working_memory(LlamaConfig(hidden_size=128)) == WorkingMemory(blocks_per_job=2, extra_bytes=4 * 128**2)
    with pytest.raises(ConfigError, match=r"^model: 3 layers cannot go two at a time"):
        method.check_model(LlamaConfig(num_hidden_layers=3))
    result = method.apply(tiny_model, W4A4, tiny_tokens, CTX)
    assert [(j["block"], j["linears"]) for j in result.stats["jobs"]] == [(0, 14)]
    tiny_model.config.num_hidden_layers = 3
    with pytest.raises(ConfigError, match="3 layers"):  # apply checks the model before any work
        method.apply(tiny_model, W4A4, tiny_tokens, CTX)
