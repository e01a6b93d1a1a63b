"""QuaRot on the tiny random LLaMA (GQA 4/2 heads, tied head): at W16A16 the rotation alone leaves the
model's function unchanged; GPTQ solves the rotated down_proj on its inputs after the online Hadamard
(checked against a Hessian computed here on an independently rotated copy); on a model with outlier
channels the rotation lowers the W4A4 error of RTN; a Qwen2 MLP width without a Hadamard matrix (19 x 64)
rotates by R_19 ⊗ H_64, exact in FP, and exports; the K cache is quantized after the Hadamard of Q and K."""
from __future__ import annotations

import copy

import pytest
import torch

from harness import BitSpec, ConfigError, QuantContext, get_method
from harness.adapter import get_adapter
from harness.export.loader import load_quantized
from harness.export.writer import export_model
from harness.method import pretrained_config
from harness.models import tiny_model
from harness.quant.gptq import GPTQOptions, gptq_solve
from harness.quant.hadamard import hadamard_transform, random_hadamard
from harness.quant.qlinear import with_input_transform
from harness.quant.rotation import KroneckerRotation, rotate_block, rotate_ends
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


def test_widths_without_a_hadamard_matrix_are_accepted():
    """TinyLlama's MLP 5632 = 11 x 512 and Qwen2.5-0.5B's 4864 = 19 x 256 rotate by R_K ⊗ H_m: nothing is refused."""
    method = get_method("quarot").from_options({})
    method.check_model(pretrained_config({"model_type": "llama", "hidden_size": 576, "intermediate_size": 5632,
                                          "num_attention_heads": 9}))
    method.check_model(pretrained_config({"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                                          "num_attention_heads": 14, "num_key_value_heads": 2}))


def qwen2_19():
    """A tiny Qwen2 (q/k/v biases) whose MLP width 1216 = 19 x 64 has no Hadamard matrix, norms off their init."""
    return with_norm_weights(tiny_model("qwen2", seed=1, intermediate_size=19 * 64))


def test_quarot_on_an_mlp_width_without_a_hadamard_is_exact_in_fp_and_quantizes_at_w4a4(tiny_tokens):
    model = qwen2_19()
    ids = tiny_tokens % model.config.vocab_size
    reference = logits(model, ids)
    rotated = copy.deepcopy(model)
    result = get_method("quarot").from_options({"weight_solver": "rtn"}).quantize(rotated, BitSpec.parse("W16A16"), ids, CTX)
    assert ((logits(rotated, ids) - reference).norm() / reference.norm()).item() < 1e-5  # float32
    down = rotated.model.layers[0].mlp.down_proj
    assert isinstance(down.input_transform, KroneckerRotation) and down.input_transform.to_dict() == {
        "kind": "kronecker", "size": 1216, "seed": CTX.seed}
    assert result.stats["rotations"]["down_proj input"] == f"R_19 (seed {CTX.seed}) ⊗ H_64 online, 19 + 6 MACs per element"

    w4a4 = copy.deepcopy(model)
    get_method("quarot").from_options({"weight_solver": "rtn"}).quantize(w4a4, BitSpec.parse("W4A4"), ids, CTX)
    down = w4a4.model.layers[1].mlp.down_proj
    assert isinstance(down.input_transform, KroneckerRotation) and down.spec.name == "W4A4"
    assert max(len(row.unique()) for row in down.quantized_weight()) <= 16 and down.act_quant.bits == 4  # 4-bit rows
    out = logits(w4a4, ids)
    assert torch.isfinite(out).all() and not torch.allclose(out, reference, atol=1e-3)


def test_quarot_export_of_a_kronecker_rotated_model_reloads_bit_identical(tiny_tokens, tmp_path):
    model = qwen2_19()
    ids = tiny_tokens % model.config.vocab_size
    get_method("quarot").from_options({"weight_solver": "rtn"}).quantize(model, BitSpec.parse("W4A4KV4"), ids, CTX)
    export_model(model, None, tmp_path / "qwen2")
    reloaded = load_quantized(tmp_path / "qwen2")
    transform = reloaded.model.layers[0].mlp.down_proj.input_transform
    assert isinstance(transform, KroneckerRotation) and (transform.size, transform.seed) == (1216, CTX.seed)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


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


def sylvester_normalised(d: int) -> torch.Tensor:
    """H_d / sqrt(d) from the popcount formula (Sylvester's matrix, symmetric)."""
    i = torch.arange(d)
    both = i[:, None] & i[None, :]
    return (-1.0) ** sum((both >> bit) & 1 for bit in range(d.bit_length())).float() / d ** 0.5


def with_an_outlier_key_channel(model):
    """Channel 3 of K (key head 0) 30x the rest in every block, as trained LLMs' K caches have."""
    model = with_norm_weights(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[3] *= 30
    return model


def keys_at_the_k_quantizer(model, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0's key after RoPE as its attention quantizer receives it, and the input of its K quantizer."""
    quantizer = model.model.layers[0].self_attn.qkv_quant
    seen = {}
    hooks = [quantizer.register_forward_pre_hook(lambda _m, args: seen.__setitem__("key", args[1])),
             quantizer.k.register_forward_pre_hook(lambda _m, args: seen.__setitem__("k", args[0]))]
    logits(model, tokens)
    for hook in hooks:
        hook.remove()
    return seen["key"], seen["k"]


def test_the_k_cache_is_quantized_after_the_hadamard_of_each_heads_key(tiny_model, tiny_tokens):
    """FP equivalence cannot see the K-cache rotation ((Q H)(K H)^T = Q K^T): the K quantizer's input must be each
    head's key times H_16, and the outlier channel of key head 0 spread over the head (max / rms per token halved)."""
    model = with_an_outlier_key_channel(tiny_model)
    get_method("quarot").from_options({"weight_solver": "rtn"}).quantize(model, BitSpec.parse("W16A16KV4"), tiny_tokens, CTX)
    key, k = keys_at_the_k_quantizer(model, tiny_tokens)  # (batch, kv heads, tokens, head_dim)
    torch.testing.assert_close(k, key @ sylvester_normalised(16), rtol=1e-5, atol=1e-5)

    def peak(t: torch.Tensor) -> torch.Tensor:  # per kv head: mean over tokens of max|x| / rms(x) over head_dim
        return (t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean(dim=(0, 2))

    assert peak(k)[0] < 0.6 * peak(key)[0], (peak(k), peak(key))


def attention_score_error(model, tokens) -> float:
    """Block 0's attention scores Q' K'^T after its attention quantizer against the FP scores Q K^T, relative."""
    quantizer = model.model.layers[0].self_attn.qkv_quant
    seen = {}
    hooks = [quantizer.register_forward_pre_hook(lambda _m, args: seen.__setitem__("in", args)),
             quantizer.register_forward_hook(lambda _m, _args, out: seen.__setitem__("out", out))]
    logits(model, tokens)
    for hook in hooks:
        hook.remove()
    (q, k, _), (q_seen, k_quantized, _) = seen["in"], seen["out"]
    groups = q.shape[1] // k.shape[1]  # each kv head serves `groups` query heads
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2)
    quantized = q_seen @ k_quantized.repeat_interleave(groups, 1).transpose(-1, -2)
    return ((quantized - scores).norm() / scores.norm()).item()


def test_rotating_q_and_k_lowers_the_kv4_error_of_the_attention_scores(tiny_model, tiny_tokens):
    """The same quantized model with and without the Q/K Hadamard (``rotate_qk``) on a key with an outlier channel."""
    model = with_an_outlier_key_channel(tiny_model)
    get_method("quarot").from_options({"weight_solver": "rtn"}).quantize(model, BitSpec.parse("W16A16KV4"), tiny_tokens, CTX)
    errors = {}
    for rotate in (True, False):
        model.model.layers[0].self_attn.qkv_quant.rotate_qk = rotate
        errors[rotate] = attention_score_error(model, tiny_tokens)
    assert errors[True] < 0.85 * errors[False], errors
