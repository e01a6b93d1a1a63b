from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from harness.adapter import LlamaAdapter
from harness.bits import BitSpec
from harness.models import TINY_FAMILY_CONFIGS, tiny_model
from harness.quant.attention import (
    EAGER_IMPLEMENTATION,
    IMPLEMENTATION,
    attention_quantizers,
    describe,
    eager_kernel,
    install,
    reinstall,
    set_clip,
    set_qk_transforms,
)
from harness.quant.online import OnlineTransform, register_online_transform
from harness.quant.qlinear import quantize_block, quantize_linears, quantizers_disabled
from harness.quant.quantizer import quantize_activation
from harness.scheme import QuantSchemeConfig


def numpy_per_row_asym(x: np.ndarray, bits: int) -> np.ndarray:
    """Independent asymmetric min/max fake quantization, one range per row of the last axis."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    qmax = 2**bits - 1
    scale = np.clip((hi - lo) / np.float32(qmax), np.float32(1e-5), np.float32(1e4))
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, qmax) - zero) * scale


def test_attention_output_matches_independent_per_token_per_head_computation(tiny_model):
    torch.manual_seed(0)
    layer = tiny_model.model.layers[0]
    attn = layer.self_attn
    quantize_block(layer, BitSpec.parse("W16A4", attention=True), LlamaAdapter())
    assert attn.config._attn_implementation == IMPLEMENTATION
    x = torch.randn(2, 9, tiny_model.config.hidden_size)
    cos, sin = tiny_model.model.rotary_emb(x, torch.arange(9).unsqueeze(0))
    with torch.no_grad():
        got = attn(x, position_embeddings=(cos, sin), attention_mask=None)[0]
        # the reference: linears see 4-bit per-token inputs (W16: FP weights), then Q/K/V per (token, head)
        xq = torch.from_numpy(numpy_per_row_asym(x.numpy(), 4))
        heads, kv, d = 4, 2, attn.head_dim

        def proj(m, n):
            return torch.nn.functional.linear(xq, m.weight).view(2, 9, n, d).transpose(1, 2)

        q, k, v = proj(attn.q_proj, heads), proj(attn.k_proj, kv), proj(attn.v_proj, kv)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k, v = (torch.from_numpy(numpy_per_row_asym(t.numpy(), 4)) for t in (q, k, v))
        k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(torch.triu(torch.ones(9, 9, dtype=torch.bool), 1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, heads * d)
        xo = torch.from_numpy(numpy_per_row_asym(out.numpy(), 4))
        ref = torch.nn.functional.linear(xo, attn.o_proj.weight)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-3)


def test_quantizing_kv_heads_before_repeat_equals_after():
    # repeat_kv copies whole heads and the range is per (token, head): same values either way
    k = torch.randn(2, 3, 11, 16) * torch.linspace(0.1, 5, 16)
    torch.testing.assert_close(quantize_activation(repeat_kv(k, 4), 4), repeat_kv(quantize_activation(k, 4), 4), rtol=0, atol=0)


def test_auto_turns_attention_on_only_with_quantized_activations():
    auto = QuantSchemeConfig()
    assert auto.bit_spec("W4A4").quantizes_attention and auto.bit_spec("W8A8").attention
    assert not auto.bit_spec("W4A16").attention
    assert not QuantSchemeConfig(attention=False).bit_spec("W4A4").attention
    assert QuantSchemeConfig(attention=True).bit_spec("W4A16").attention
    assert not QuantSchemeConfig(attention=True).bit_spec("W4A16").quantizes_attention  # A16: nothing to quantize
    # keys of runs without it do not change: the field is left out of to_dict
    assert "attention" not in BitSpec.parse("W4A4").to_dict()
    assert BitSpec.from_dict(auto.bit_spec("W4A4").to_dict()) == auto.bit_spec("W4A4")


def test_attention_off_leaves_the_model_as_before_and_on_differs(tiny_model, tiny_tokens):
    with torch.no_grad():
        quantize_linears(tiny_model, BitSpec.parse("W4A4"))
        assert tiny_model.config._attn_implementation == "sdpa" and not attention_quantizers(tiny_model)
        linears_only = tiny_model(tiny_tokens).logits
    from harness.models import tiny_llama

    model = tiny_llama(seed=0, vocab_size=256)
    with torch.no_grad():
        quantize_linears(model, BitSpec.parse("W4A4", attention=True))
        assert len(attention_quantizers(model)) == 3 * model.config.num_hidden_layers  # Q, K and V per block
        full = model(tiny_tokens).logits
        with quantizers_disabled(model):
            fp = model(tiny_tokens).logits
        # switching only the attention quantizers off gives back the linears-only model exactly
        for q in attention_quantizers(model):
            q.enabled = False
        torch.testing.assert_close(model(tiny_tokens).logits, linears_only, rtol=0, atol=0)
    assert not torch.allclose(full, linears_only)
    assert not torch.allclose(full, fp)


@pytest.mark.parametrize("method, options", [
    ("rtn", {}), ("smoothquant", {}), ("omniquant", {"epochs": 1}),
    ("qllm", {"epochs": 1, "blocks_per_job": 1, "final_norm": "off"}),
])
def test_every_method_quantizes_attention_inputs(tiny_model, tiny_tokens, method, options):
    from harness.method import QuantContext
    from harness.registry import get_method

    spec = QuantSchemeConfig().bit_spec("W4A4")
    seen = []
    hook_targets = [layer.self_attn for layer in tiny_model.model.layers]
    result = get_method(method).from_options(options).quantize(tiny_model, spec, tiny_tokens, QuantContext(progress=False))
    quantizers = attention_quantizers(result.model)
    assert len(quantizers) == 3 * len(hook_targets) and all(q.enabled and q.bits == 4 for q in quantizers)  # Q, K, V
    for q in quantizers:
        q.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
    with torch.no_grad():
        result.model(tiny_tokens)
    head_dim = hook_targets[0].head_dim
    assert seen and all(d == head_dim for d in seen)  # per (token, head) vectors, Q, K and V of every block
    assert len(seen) == 3 * len(hook_targets)


def test_projection_scope_quantizes_qkv_outputs_per_token_over_all_heads(tiny_model, tiny_tokens):
    """SmoothQuant's official variant: q/k/v projection outputs, one range per token, before RoPE."""
    spec = QuantSchemeConfig(attention=True, attention_scope="projection", act_symmetric=True).bit_spec("W8A8")
    assert spec.to_dict()["attention_scope"] == "projection" and "attention_scope" not in QuantSchemeConfig().bit_spec("W8A8").to_dict()
    quantize_linears(tiny_model, spec)
    assert not attention_quantizers(tiny_model) and tiny_model.config._attn_implementation == "sdpa"
    attn = tiny_model.model.layers[0].self_attn
    x = torch.randn(2, 5, tiny_model.config.hidden_size)
    for name in ("q_proj", "k_proj", "v_proj"):
        linear = getattr(attn, name)
        y = torch.nn.functional.linear(quantize_activation(x, 8, True), linear.weight_quant(linear.weight))
        torch.testing.assert_close(linear(x), quantize_activation(y, 8, True))  # the whole output row, all heads
    assert attn.o_proj.out_quant is None and tiny_model.model.layers[0].mlp.up_proj.out_quant is None
    with torch.no_grad(), quantizers_disabled(tiny_model):
        assert not attn.q_proj.out_quant.enabled
    assert attn.q_proj.out_quant.enabled


def test_an_eager_model_keeps_the_eager_kernel_behind_the_quantizer(tiny_tokens):
    """The official layers' kernel (explicit matmul + softmax) when the model was set to eager; causal either way."""
    from harness.models import tiny_llama

    models = {}
    for kernel in ("sdpa", "eager"):
        model = tiny_llama(seed=0, vocab_size=256)
        model.set_attn_implementation(kernel)
        quantize_linears(model, BitSpec.parse("W4A4", attention=True))
        models[kernel] = model
    assert models["sdpa"].config._attn_implementation == IMPLEMENTATION
    assert models["eager"].config._attn_implementation == EAGER_IMPLEMENTATION
    seen = []
    for q in attention_quantizers(models["eager"]):
        q.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    tokens = tiny_tokens[:1]
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    with torch.no_grad():
        out = models["eager"](tokens).logits
        assert len(seen) == 3 * len(models["eager"].model.layers)  # Q, K, V of every block went through it
        # causal: a different last token changes nothing before it (the eager mask is there)
        torch.testing.assert_close(models["eager"](changed).logits[:, :-1], out[:, :-1], rtol=0, atol=0)
        with quantizers_disabled(models["eager"]), quantizers_disabled(models["sdpa"]):
            torch.testing.assert_close(models["eager"](tokens).logits, models["sdpa"](tokens).logits, rtol=1e-4, atol=1e-4)


def test_blocks_called_without_a_mask_stay_causal_with_the_eager_kernel():
    """The block-wise engine and QLLM's search pass attention_mask=None: causal with SDPA, and with eager too."""
    from harness.models import tiny_llama

    outs = {}
    for kernel, quantized in (("sdpa", False), ("eager", False), ("eager", True)):
        model = tiny_llama(seed=0, vocab_size=256)
        model.set_attn_implementation(kernel)
        layer = model.model.layers[0]
        if quantized:
            quantize_block(layer, BitSpec.parse("W16A8", attention=True), LlamaAdapter())
        h = torch.randn(1, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        changed = h.clone()
        changed[0, -1] += 1.0
        pe = model.model.rotary_emb(h, torch.arange(7).unsqueeze(0))
        with torch.no_grad(), quantizers_disabled(model):
            out = LlamaAdapter().run_layer(layer, h, pe)
            torch.testing.assert_close(LlamaAdapter().run_layer(layer, changed, pe)[:, :-1], out[:, :-1], rtol=0, atol=0)
        outs[(kernel, quantized)] = out
    torch.testing.assert_close(outs[("eager", False)], outs[("sdpa", False)], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[("eager", True)], outs[("sdpa", False)], rtol=1e-5, atol=1e-5)


def test_kv_bits_quantize_k_and_v_per_token_and_head_and_leave_q_fp(tiny_model):
    """W16A16KV4 with attention off (QuaRot): Q FP, K after RoPE and V at 4 bits, against the independent reference."""
    layer = tiny_model.model.layers[0]
    attn = layer.self_attn
    quantize_block(layer, BitSpec.parse("W16A16KV4"), LlamaAdapter())
    x = torch.randn(2, 9, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = tiny_model.model.rotary_emb(x, torch.arange(9).unsqueeze(0))
    with torch.no_grad():
        got = attn(x, position_embeddings=(cos, sin), attention_mask=None)[0]
        heads, kv, d = 4, 2, attn.head_dim

        def proj(m, n):
            return torch.nn.functional.linear(x, m.weight).view(2, 9, n, d).transpose(1, 2)

        q, k, v = proj(attn.q_proj, heads), proj(attn.k_proj, kv), proj(attn.v_proj, kv)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = (torch.from_numpy(numpy_per_row_asym(t.numpy(), 4)) for t in (k, v))
        k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(torch.triu(torch.ones(9, 9, dtype=torch.bool), 1), float("-inf"))
        ref = torch.nn.functional.linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, heads * d), attn.o_proj.weight)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-3)
    q_quant, k_quant, v_quant = attention_quantizers(tiny_model)
    assert not q_quant.enabled and (k_quant.bits, v_quant.bits) == (4, 4)


def test_the_qk_hadamard_is_exact_in_fp_and_clip_ratios_shrink_the_range(tiny_model, tiny_tokens):
    with torch.no_grad():
        reference = tiny_model(tiny_tokens).logits
        for layer in tiny_model.model.layers:  # every quantizer at 16 bits: only the rotation acts
            install(layer.self_attn, BitSpec.parse("W16A16KV16")).rotate_qk = True
        assert len(attention_quantizers(tiny_model)) == 3 * tiny_model.config.num_hidden_layers
        torch.testing.assert_close(tiny_model(tiny_tokens).logits, reference, atol=1e-5, rtol=1e-4)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    lo, hi = x.amin(-1, keepdim=True) * 0.9, x.amax(-1, keepdim=True) * 0.9
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    expected = (torch.clamp(torch.round(x / scale) + zero, 0, 15) - zero) * scale
    torch.testing.assert_close(quantize_activation(x, 4, clip_ratio=0.9), expected, atol=1e-6, rtol=0)


@register_online_transform
class TimesMatrix(OnlineTransform):
    """x -> x M over the last dimension, M in the recipe (a test's own online transform)."""

    kind = "test_attention.times_matrix"

    def __init__(self, matrix) -> None:
        super().__init__()
        self.matrix = torch.as_tensor(matrix, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.to(x.dtype)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "matrix": self.matrix.tolist()}


def test_q_and_k_transforms_are_exact_in_fp_feed_the_quantizers_and_come_back_with_their_clips(tiny_model, tiny_tokens):
    """set_qk_transforms(Q M^-T, K M): the FP logits are unchanged; the K quantizer sees K M; describe / reinstall (through
    JSON) rebuild the transforms and set_clip's ratios, and a ratio changed by hand is still refused."""
    import copy
    import json

    d = tiny_model.config.hidden_size // tiny_model.config.num_attention_heads
    m = torch.eye(d) + 0.3 * torch.randn(d, d, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(tiny_model)
    with torch.no_grad():
        reference = tiny_model(tiny_tokens).logits
        for layer in tiny_model.model.layers:
            set_qk_transforms(install(layer.self_attn, BitSpec.parse("W16A16KV16")), TimesMatrix(torch.linalg.inv(m).T),
                              TimesMatrix(m))
        torch.testing.assert_close(tiny_model(tiny_tokens).logits, reference, atol=1e-5, rtol=1e-4)

    attn = tiny_model.model.layers[0].self_attn
    quantizer = install(attn, BitSpec.parse("W16A16KV4"))
    set_qk_transforms(quantizer, TimesMatrix(torch.linalg.inv(m).T), TimesMatrix(m))
    set_clip(quantizer, "k", 0.8, 0.6)
    assert (quantizer.k.clip_ratio, quantizer.k.clip_ratio_min) == (0.8, 0.6)
    seen = {}
    quantizer.k_transform.register_forward_hook(lambda mod, i, o: seen.update(key=i[0], transformed=o))
    quantizer.k.register_forward_pre_hook(lambda mod, i: seen.update(quantized=i[0]))
    with torch.no_grad():
        expected = tiny_model(tiny_tokens).logits
    torch.testing.assert_close(seen["transformed"], seen["key"] @ m)
    assert torch.equal(seen["quantized"], seen["transformed"])

    data = json.loads(json.dumps(describe(attn)))
    assert data["clips"] == {"k": [0.8, 0.6]} and data["k_transform"]["kind"] == TimesMatrix.kind
    for layer, source in zip(twin.model.layers, tiny_model.model.layers):
        reinstall(layer.self_attn, json.loads(json.dumps(describe(source.self_attn))))
    with torch.no_grad():
        assert torch.equal(twin(tiny_tokens).logits, expected)
    quantizer.k.clip_ratio = 0.5
    with pytest.raises(ValueError, match="changed after install"):
        describe(attn)


@pytest.mark.parametrize("family", sorted(TINY_FAMILY_CONFIGS))
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_the_routed_kernel_is_the_familys_own(family, kernel):
    """Behind the quantizers (16 bits here: no rounding), each family's attention computes what its own kernel does:
    its eager function (Gemma's has softcapping and a default scaling), its scaling, its windows' masks."""
    model = tiny_model(family, seed=1, attention_kernel=kernel)
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))  # longer than the windows (16)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
    for layer in model.model.layers:
        install(layer.self_attn, BitSpec.parse("W16A16"))
    assert model.config._attn_implementation == (EAGER_IMPLEMENTATION if kernel == "eager" else IMPLEMENTATION)
    if kernel == "eager":
        assert eager_kernel(model.model.layers[0].self_attn).__module__ == type(model.model.layers[0].self_attn).__module__
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, reference, rtol=0, atol=0)
