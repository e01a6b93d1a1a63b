"""Throughput of perplexity evaluation: fake-quantized model vs the plain FP model, in one process.

Fake quantization must not make benchmarking slow: after ``freeze()`` the weights are stored
quantized, so only the per-token activation quantizer costs extra. This measures both models on
the same windows, alternating FP and quantized passes so machine noise hits both alike, and
reports the median throughput ratio (quantized / FP; 1.0 = no overhead).
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

from harness.data.windows import eval_windows
from harness.evaluation.evaluate import perplexity
from harness.method import QuantContext
from harness.models import load_model, resolve_device
from harness.registry import get_method
from harness.scheme import effective_spec


@dataclass
class BenchResult:
    spec: str
    tokens: int
    fp_tokens_per_s: float
    quant_tokens_per_s: float
    fp_ppl: float
    quant_ppl: float

    @property
    def ratio(self) -> float:
        return self.quant_tokens_per_s / self.fp_tokens_per_s


def throughput_ratio(model_name: str = "smollm2-135m", spec: str = "W4A4", method: str = "rtn", windows: int = 4,
                     seqlen: int = 512, repeats: int = 3, dataset: str = "brown", device: str = "auto",
                     options: dict | None = None) -> BenchResult:
    dev = resolve_device(device)
    loaded = load_model(model_name, device=device)
    fp_model = loaded.model.to(dev)
    quant_model = copy.deepcopy(fp_model).cpu()
    # no calibration data: a data-free method (rtn, quarot with weight_solver: rtn) or one that refuses in one line
    method_cls = get_method(method)
    # the model a sweep evaluates: the method's quant_defaults, Q/K/V and the KV cache quantized as a sweep quantizes them
    bits = effective_spec(method_cls, spec)
    method_cls.from_options(options or {}).apply(quant_model, bits, None, QuantContext(device=dev, progress=False))
    quant_model = quant_model.to(dev)
    data = eval_windows(dataset, loaded.tokenizer, seqlen, windows)
    tokens = data.numel()

    def timed(model: torch.nn.Module) -> tuple[float, float]:
        t = time.perf_counter()
        ppl = perplexity(model, data, device=dev, progress=False)
        return tokens / (time.perf_counter() - t), ppl

    timed(fp_model), timed(quant_model)  # warm-up: allocator, kernels, caches
    fp, quant = [], []
    for _ in range(repeats):
        fp.append(timed(fp_model))
        quant.append(timed(quant_model))
    return BenchResult(spec, tokens, statistics.median(t for t, _ in fp), statistics.median(t for t, _ in quant), fp[0][1], quant[0][1])
