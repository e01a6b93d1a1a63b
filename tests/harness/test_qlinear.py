from __future__ import annotations

import torch
from torch import nn

from harness.bits import BitSpec
from harness.qlinear import QuantLinear, freeze, quant_linears, quantize_linears, quantizers_disabled
from harness.quantizer import quantize_activation, quantize_weight


def test_quant_linear_computes_on_quantized_input_and_weight():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    x = torch.randn(3, 7, 32)
    spec = BitSpec.parse("W4A8")
    ref = torch.nn.functional.linear(quantize_activation(x, 8), quantize_weight(linear.weight, spec), linear.bias)
    q = QuantLinear(linear, spec)
    torch.testing.assert_close(q(x), ref)
    freeze_ref = q(x)
    q.freeze()
    torch.testing.assert_close(q(x), freeze_ref)  # freezing stores the same quantized weight
    assert q.frozen and isinstance(q.weight_quant, nn.Identity)


def test_quantize_linears_swaps_every_decoder_linear_only(tiny_model):
    swapped = quantize_linears(tiny_model, BitSpec.parse("W4A4"))
    n_layers = tiny_model.config.num_hidden_layers
    assert len(swapped) == 7 * n_layers
    assert not isinstance(tiny_model.lm_head, QuantLinear)
    assert sum(1 for _ in quant_linears(tiny_model)) == 7 * n_layers
    assert quantize_linears(tiny_model, BitSpec.parse("W4A4")) == {}  # idempotent


def test_quantizers_disabled_gives_fp_output(tiny_model, tiny_tokens):
    with torch.no_grad():
        fp = tiny_model(tiny_tokens).logits
        quantize_linears(tiny_model, BitSpec.parse("W3A3"))
        with quantizers_disabled(tiny_model):
            torch.testing.assert_close(tiny_model(tiny_tokens).logits, fp)
        quantized = tiny_model(tiny_tokens).logits
    assert (quantized - fp).abs().max() > 1e-3


def test_freeze_whole_model(tiny_model, tiny_tokens):
    quantize_linears(tiny_model, BitSpec.parse("W4A16"))
    with torch.no_grad():
        before = tiny_model(tiny_tokens).logits
        freeze(tiny_model)
        torch.testing.assert_close(tiny_model(tiny_tokens).logits, before)
    assert all(m.frozen for _, m in quant_linears(tiny_model))
