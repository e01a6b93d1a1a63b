"""The throughput benchmark runs and measures both models (its ratio is printed by `ptqbench bench`)."""
from __future__ import annotations

import math

from harness.bench import throughput_ratio


def test_bench_measures_both_models():
    r = throughput_ratio("tiny-random-llama", "W4A4", windows=2, seqlen=32, repeats=1, device="cpu")
    assert r.tokens == 64 and r.fp_tokens_per_s > 0 and r.quant_tokens_per_s > 0
    assert math.isfinite(r.ratio) and r.quant_ppl != r.fp_ppl
