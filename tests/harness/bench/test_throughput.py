"""The throughput benchmark measures both models on the same windows (its ratio is printed by `ptqbench bench`).

No timing thresholds: the fields must agree with each other and with an independent evaluation.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness import BitSpec, freeze, quantize_linears
from harness.bench.throughput import throughput_ratio
from harness.data.windows import eval_windows
from harness.evaluation.evaluate import perplexity
from harness.models import load_model


def test_bench_fields_agree_with_an_independent_evaluation():
    r = throughput_ratio("tiny-random-llama", "W4A4", windows=2, seqlen=32, repeats=1, device="cpu")
    assert r.spec == "W4A4" and r.tokens == 2 * 32
    assert r.fp_tokens_per_s > 0 and r.quant_tokens_per_s > 0 and math.isfinite(r.ratio)
    assert r.ratio == pytest.approx(r.quant_tokens_per_s / r.fp_tokens_per_s, rel=1e-12)
    # the perplexities are those of the FP model and of the model a sweep evaluates for RTN W4A4 (linears and
    # Q/K/V quantized: attention auto), recomputed here on the same windows
    loaded = load_model("tiny-random-llama", device="cpu")
    data = eval_windows("brown", loaded.tokenizer, 32, 2)
    cpu = torch.device("cpu")
    assert r.fp_ppl == pytest.approx(perplexity(loaded.model, data, device=cpu, progress=False), rel=1e-5)
    spec = BitSpec.parse("W4A4", attention=True)
    quantize_linears(loaded.model, spec)
    freeze(loaded.model)
    assert r.quant_ppl == pytest.approx(perplexity(loaded.model, data, device=cpu, progress=False), rel=1e-5)
    assert r.quant_ppl != pytest.approx(r.fp_ppl, rel=1e-4)  # the quantized model is a different model


def test_bench_times_quarot_with_its_online_transforms():
    """A rotated model at W16A16 is the FP model: equal perplexity, through the online Hadamards."""
    r = throughput_ratio("tiny-random-llama", "W16A16", method="quarot", options={"weight_solver": "rtn"}, windows=2, seqlen=32,
                         repeats=1, device="cpu")
    assert r.quant_ppl == pytest.approx(r.fp_ppl, rel=1e-4) and r.quant_tokens_per_s > 0
