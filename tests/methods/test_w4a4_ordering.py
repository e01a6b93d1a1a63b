"""The paper's ordering at W4A4 on the real model: QLLM < OmniQuant-style < SmoothQuant < RTN.

Arguments of the QLLM paper's LLaMA-1 and LLaMA-2 tables (W4A4) reproduced on smollm2-135m with the demo's
CPU-sized settings (tests/methods/conftest.py). A failure here is a finding to report, not a
threshold to tune.
"""
from __future__ import annotations

import pytest


@pytest.mark.smollm2
def test_w4a4_perplexity_follows_the_papers_ordering(w4a4_ppl):
    ppl = {m: w4a4_ppl(m) for m in ("rtn", "smoothquant", "omniquant", "qllm")}
    assert ppl["qllm"] < ppl["omniquant"] < ppl["smoothquant"] < ppl["rtn"], ppl
