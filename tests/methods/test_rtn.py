"""RTN on the real model: perplexity rises as bits fall (the foundation's acceptance numbers)."""
from __future__ import annotations

import copy

import pytest
import torch

from harness import BitSpec, QuantContext, get_method, quant_linears
from harness.evaluate import perplexity
from harness.quantizer import quantize_weight


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
def test_rtn_perplexity_rises_as_bits_fall(smollm2, brown_eval):
    model, _ = smollm2
    cpu = torch.device("cpu")
    ppl = {"fp": perplexity(model, brown_eval, device=cpu, progress=False)}
    for spec in ("W8A8", "W4A4"):
        m = copy.deepcopy(model)
        get_method("rtn")().quantize(m, BitSpec.parse(spec), None, QuantContext())
        ppl[spec] = perplexity(m, brown_eval, device=cpu, progress=False)
    assert 5 < ppl["fp"] < 200  # a trained model on English text, not a random one (vocab 49k)
    assert abs(ppl["W8A8"] / ppl["fp"] - 1) < 0.02
    assert ppl["W4A4"] > 3 * ppl["fp"]
