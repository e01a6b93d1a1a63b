"""RTN on the real model: perplexity rises as bits fall (the foundation's acceptance numbers)."""
from __future__ import annotations

import pytest
import torch

from harness import BitSpec, QuantContext, get_method, quant_linears
from harness.evaluation.evaluate import perplexity
from harness.quant.quantizer import quantize_weight


def test_rtn_weights_lie_on_the_grid(tiny_model):
    original = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    spec = BitSpec.parse("W4A4")
    get_method("rtn")().quantize(tiny_model, spec, None, QuantContext())
    layers = dict(quant_linears(tiny_model))
    assert set(layers) == set(original)
    for name, module in layers.items():
        torch.testing.assert_close(module.weight, quantize_weight(original[name], spec))
        assert module.act_quant.enabled and module.frozen


@pytest.mark.smollm2
def test_rtn_perplexity_rises_as_bits_fall(smollm2, brown_eval, fp_ppl, w4a4_ppl):
    """FP and RTN W4A4 come from the session cache (tests/methods/conftest.py); W8A8 is computed here."""
    model, _ = smollm2
    get_method("rtn")().quantize(model, BitSpec.parse("W8A8"), None, QuantContext())
    w8a8 = perplexity(model, brown_eval, device=torch.device("cpu"), progress=False)
    assert 5 < fp_ppl < 200  # a trained model on English text, not a random one (vocab 49k)
    assert abs(w8a8 / fp_ppl - 1) < 0.02
    assert w4a4_ppl("rtn") > 3 * fp_ppl
