"""GPTQ as a method and as a weight solver, on the tiny random LLaMA: block 0's q_proj equals the solver on
a Hessian computed here from the embedded calibration tokens (an independent path through the block),
GPTQ reconstructs the model better than RTN at 3 bits, SmoothQuant can round with it, and the methods
whose own training rounds the weights refuse it in one line."""
from __future__ import annotations

import copy

import pytest
import torch

from harness import BitSpec, ConfigError, QuantContext, get_method, quant_linears
from harness.method import WorkingMemory
from harness.quant.gptq import GPTQOptions, gptq_solve
from tests.harness.quant.test_gptq import official_hessian

CTX = QuantContext(device=torch.device("cpu"), seed=0, progress=False)


def logits_error(model, fp, tokens) -> float:
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(tokens).logits, fp(tokens).logits).item()


def test_block_zero_q_proj_is_the_solver_on_its_own_inputs(tiny_model, tiny_tokens):
    fp = copy.deepcopy(tiny_model)
    spec = BitSpec.parse("W4A16")
    get_method("gptq").from_options({}).quantize(tiny_model, spec, tiny_tokens, CTX)
    layer = fp.model.layers[0]
    with torch.no_grad():  # what q_proj of block 0 reads: input_layernorm of the embeddings, one sample at a time
        inputs = [layer.input_layernorm(fp.model.embed_tokens(tokens[None])) for tokens in tiny_tokens]
    expected, *_ = gptq_solve(layer.self_attn.q_proj.weight, official_hessian(inputs), spec, GPTQOptions())
    torch.testing.assert_close(tiny_model.model.layers[0].self_attn.q_proj.weight, expected, rtol=0, atol=1e-6)
    assert all(m.frozen for _, m in quant_linears(tiny_model)) and len(dict(quant_linears(tiny_model))) == 14


def test_gptq_reconstructs_the_model_better_than_rtn_at_three_bits(tiny_model, tiny_tokens):
    fp = copy.deepcopy(tiny_model)
    rtn = copy.deepcopy(tiny_model)
    spec = BitSpec.parse("W3A16")
    get_method("rtn")().quantize(rtn, spec, None, CTX)
    result = get_method("gptq").from_options({"true_sequential": True, "act_order": True}).quantize(tiny_model, spec, tiny_tokens, CTX)
    assert result.stats["quantized_linears"] == 14 and all(j["loss"] > 0 for j in result.stats["jobs"])
    assert logits_error(tiny_model, fp, tiny_tokens) < 0.8 * logits_error(rtn, fp, tiny_tokens)


def test_smoothquant_rounds_with_gptq_when_asked_and_keeps_its_rtn_results_otherwise(tiny_model, tiny_tokens):
    spec = BitSpec.parse("W4A8")
    plain, rtn_explicit, solved = (copy.deepcopy(tiny_model) for _ in range(3))
    get_method("smoothquant").from_options({}).quantize(plain, spec, tiny_tokens, CTX)
    get_method("smoothquant").from_options({"weight_solver": "rtn"}).quantize(rtn_explicit, spec, tiny_tokens, CTX)
    get_method("smoothquant").from_options({"weight_solver": "gptq"}).quantize(solved, spec, tiny_tokens, CTX)
    with torch.no_grad():
        assert torch.equal(plain(tiny_tokens).logits, rtn_explicit(tiny_tokens).logits)
        assert not torch.allclose(plain(tiny_tokens).logits, solved(tiny_tokens).logits)
    assert get_method("smoothquant").config_class().to_dict() == {"alpha": 0.5}  # runs keyed before the option keep their keys


@pytest.mark.parametrize("method, why", [("omniquant", "learned weight clipping"), ("qllm", "low-rank corrections")])
def test_methods_that_round_by_training_refuse_gptq_in_one_line(method, why):
    with pytest.raises(ConfigError, match=rf"^methods\.{method}\.weight_solver: 'gptq' is not allowed for {method}: .*{why}.*; use rtn$"):
        get_method(method).from_options({"weight_solver": "gptq"})


def test_bad_gptq_input_is_one_line_before_any_work(tiny_model, tiny_tokens):
    gptq = get_method("gptq")
    with pytest.raises(ConfigError, match=r"^act_order: with groups \(W4A16g32\) it needs static_groups: true"):
        gptq.from_options({"act_order": True}).apply(tiny_model, BitSpec.parse("W4A16g32"), tiny_tokens, CTX)
    with pytest.raises(ConfigError, match=r"^bits: W16A8 quantizes no weights"):
        gptq.from_options({}).apply(tiny_model, BitSpec.parse("W16A8"), tiny_tokens, CTX)
    assert not list(quant_linears(tiny_model))  # nothing was touched


def test_the_memory_estimate_counts_the_hessians():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)  # 70B
    together = get_method("gptq").from_options({}).working_memory(config).extra_bytes
    sequential = get_method("gptq").from_options({"true_sequential": True}).working_memory(config).extra_bytes
    assert sequential == 4 * (28672**2 + 2 * 28672**2)  # down_proj's Hessian (3.3 GB) and the solver's two copies
    assert together == sequential + 4 * 6 * 8192**2
    assert get_method("rtn")().working_memory(config) == WorkingMemory()


def test_a_sweep_refuses_gptq_options_its_bits_cannot_take_when_parsed():
    from harness.run.config import parse_config
    from tests.harness.run.executors.conftest import tiny_raw

    raw = {**tiny_raw(bits=["W4A16", "W4A16g32"]), "methods": [{"name": "gptq", "act_order": True}]}
    with pytest.raises(ConfigError, match=r"^methods\[0\] at W4A16g32: act_order: with groups \(W4A16g32\) it needs static_groups"):
        parse_config(raw)
    parse_config({**raw, "methods": [{"name": "gptq", "act_order": True, "static_groups": True}]})  # accepted
    parse_config({**raw, "bits": ["W4A16"]})  # per channel: act_order alone is fine
