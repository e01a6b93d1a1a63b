"""Perplexities on smollm2 shared by the method tests, each computed at most once per test session.

``fp_ppl``: the FP model's Brown perplexity. ``w4a4_ppl(method)``: the method's W4A4 perplexity.
Several tests compare against FP and RTN, or methods at W4A4 (each against RTN, and the paper's
ordering across all of them). Quantizing with a block-wise method costs minutes on CPU, so every
method runs once here, with the demo's method options (``configs/demo.yaml``) on the same
calibration and evaluation windows (the conftest's ``brown_calib`` / ``brown_eval``), and the tests
read the cached numbers.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from harness import BitSpec, QuantContext, get_method
from harness.evaluation.evaluate import perplexity

W4A4 = BitSpec.parse("W4A4")
# The demo's options (configs/demo.yaml); calibration is the conftest's Brown 16 x 256 windows.
DEMO_OPTIONS = {
    "rtn": {},
    "smoothquant": {"alpha": 0.5},
    "omniquant": {"epochs": 1, "max_samples": 4},
    "qllm": {"grid_steps": 10, "epochs": 1},
}


@pytest.fixture(scope="session")
def fp_ppl(_smollm2_loaded, brown_eval) -> float:
    return perplexity(_smollm2_loaded.model, brown_eval, device=torch.device("cpu"), progress=False)


@pytest.fixture(scope="session")
def w4a4_ppl(_smollm2_loaded, brown_calib, brown_eval) -> Callable[[str], float]:
    cache: dict[str, float] = {}

    def get(method: str) -> float:
        if method not in cache:
            model = copy.deepcopy(_smollm2_loaded.model)
            cls = get_method(method)
            calibration = brown_calib if cls.needs_calibration else None
            cls.from_options(DEMO_OPTIONS[method]).quantize(model, W4A4, calibration, QuantContext(progress=False))
            cache[method] = perplexity(model, brown_eval, device=torch.device("cpu"), progress=False)
            del model
        return cache[method]

    return get


@pytest.fixture
def outlier_model(tiny_model):
    """The tiny random LLaMA (4 heads, 2 KV heads) with outlier channels at every norm, as real LLM activations
    have (random ones have none): the smoothing and outlier-suppression methods' tests."""
    with torch.no_grad():
        for layer in tiny_model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40.0
            layer.post_attention_layernorm.weight[[5]] *= 25.0
    return tiny_model
