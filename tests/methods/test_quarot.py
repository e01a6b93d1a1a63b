"""QuaRot on the tiny random LLaMA (GQA 4/2 heads, tied head): at W16A16 the rotation alone leaves the
model's function unchanged; GPTQ solves the rotated down_proj on its inputs after the online Hadamard
(checked against a Hessian computed here on an independently rotated copy); on a model with outlier
channels the rotation lowers the W4A4 error of RTN; widths without a Hadamard construction are refused."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig

from harness import BitSpec, ConfigError, QuantContext, get_method
from harness.adapter import get_adapter
from harness.method import pretrained_config
from harness.quant.gptq import GPTQOptions, gptq_solve
from harness.quant.hadamard import hadamard_transform, random_hadamard
from harness.quant.qlinear import with_input_transform
from harness.quant.rotation import rotate_block, rotate_ends
from tests.harness.quant.test_gptq import official_hessian

CTX = QuantContext(device=torch.device("cpu"), seed=0, progress=False)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def with_norm_weights(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


@pytest.mark.parametrize("solver", ["rtn", "gptq"])
def test_rotation_alone_keeps_the_fp_function(tiny_model, tiny_tokens, solver):
    model = with_norm_weights(tiny_model)
    reference, embedding = logits(model, tiny_tokens), model.model.embed_tokens.weight.detach().clone()
    get_method("quarot").from_options({"weight_solver": solver}).quantize(model, BitSpec.parse("W16A16"), tiny_tokens, CTX)
    out = logits(model, tiny_tokens)
    assert (out - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert not torch.allclose(model.model.embed_tokens.weight, embedding, atol=1e-3)  # rotated, not left alone


def test_gptq_solves_the_rotated_down_proj_on_its_transformed_inputs(tiny_model, tiny_tokens):
    model = with_norm_weights(tiny_model)
    rotated = copy.deepcopy(model)
    spec = BitSpec.parse("W4A16")
    get_method("quarot").from_options({"true_sequential": False}).quantize(model, spec, tiny_tokens, CTX)
    # the same rotation by hand, then block 0's down_proj inputs, one sample at a time, through the FP block
    adapter = get_adapter(rotated)
    q = random_hadamard(rotated.config.hidden_size, CTX.seed)
    rotate_ends(rotated, adapter, q)
    layer = adapter.layers(rotated)[0]
    for name, transform in rotate_block(layer, adapter, q, adapter.attention_geometry(rotated)[2]).items():
        with_input_transform(layer, name, transform)
    inputs = []
    hook = layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: inputs.append(hadamard_transform(args[0])))
    with torch.no_grad():
        for tokens in tiny_tokens:
            rotated(tokens[None])
    hook.remove()
    expected, *_ = gptq_solve(layer.mlp.down_proj.weight, official_hessian(inputs), spec, GPTQOptions(clip_search=True))
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, expected, rtol=0, atol=1e-5)


def test_rotation_lowers_the_activation_quantization_error_on_a_model_with_outlier_channels(tiny_model, tiny_tokens):
    """Per-token 4-bit activations (weights FP: this random model's Gaussian weights gain nothing from rotating)."""
    model = with_norm_weights(tiny_model)
    with torch.no_grad():  # a few residual channels 30x larger than the rest, as in trained LLMs
        model.model.embed_tokens.weight[:, :3] *= 30
    reference = logits(model, tiny_tokens)
    spec = BitSpec.parse("W16A4")
    errors = {}
    for name, options in (("rtn", {}), ("quarot", {"weight_solver": "rtn"})):
        quantized = copy.deepcopy(model)
        get_method(name).from_options(options).quantize(quantized, spec, tiny_tokens, CTX)
        errors[name] = torch.nn.functional.mse_loss(logits(quantized, tiny_tokens), reference).item()
    assert errors["quarot"] < 0.5 * errors["rtn"], errors


def test_a_width_without_a_hadamard_construction_is_refused_in_one_line():
    method = get_method("quarot").from_options({})
    config = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 5632, "num_attention_heads": 9}
    with pytest.raises(ConfigError, match=r"^model: intermediate_size 5632 cannot be rotated by quarot: no Hadamard matrix"):
        method.check_model(pretrained_config(config))  # config.json as the sweep reads it
    method.check_model(LlamaConfig(**{**config, "intermediate_size": 1536}))  # smollm2-135m: 12 x 128


def test_kv4_quantizes_the_k_cache_in_the_rotated_basis_and_w16a16kv16_stays_exact(tiny_model, tiny_tokens):
    from harness.quant.attention import attention_quantizers

    model = with_norm_weights(tiny_model)
    reference = logits(model, tiny_tokens)
    kv4 = copy.deepcopy(model)
    get_method("quarot").from_options({"weight_solver": "rtn"}).quantize(model, BitSpec.parse("W16A16KV16"), tiny_tokens, CTX)
    assert (logits(model, tiny_tokens) - reference).abs().max() <= 1e-4 * reference.abs().max()
    get_method("quarot").from_options({"weight_solver": "rtn"}).quantize(kv4, BitSpec.parse("W16A16KV4"), tiny_tokens, CTX)
    attn = kv4.model.layers[0].self_attn
    assert attn.qkv_quant.rotate_qk and [q.bits for q in attention_quantizers(kv4)][:3] == [16, 4, 4]
    assert not torch.allclose(logits(kv4, tiny_tokens), reference, atol=1e-4)  # the 4-bit cache changes the model


def test_a_norm_that_cannot_be_folded_is_refused_in_one_line_naming_it(tiny_model, tiny_tokens):
    layer = tiny_model.model.layers[1]
    layer.post_attention_layernorm = torch.nn.LayerNorm(tiny_model.config.hidden_size)
    before = tiny_model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ConfigError, match=r"^model: layers\.1\.post_attention_layernorm \(LayerNorm\) cannot be folded"):
        get_method("quarot").from_options({"weight_solver": "rtn"}).quantize(tiny_model, BitSpec.parse("W4A4"), tiny_tokens, CTX)
    assert torch.equal(tiny_model.model.embed_tokens.weight, before)  # refused before any work
