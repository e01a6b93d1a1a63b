"""Throughput of perplexity evaluation: the model a sweep evaluates against the plain FP model, in one process.

``ptqbench bench`` (and ``make bench``) runs this. Each row is one method at one bit spec, quantized the way a
sweep quantizes it: the method entries and bit specs are parsed by the sweep's own parser and planned by its
planner (``harness.run.config``, ``harness.run.execute.plan``), so the bit spec is the sweep's effective one
(``harness.scheme.effective_spec``: the method's ``quant_defaults``, Q/K/V and the KV cache as ``quant.attention``
and a KV part say) and a method that needs data calibrates once on the run's calibration windows (a small set by
default: the evaluation's speed does not depend on it). The quantized model is then timed on the same perplexity
windows as a copy of the FP model, in pairs of one FP and one quantized pass (FP first, then quantized first, in
turn) so machine noise hits both alike; a row reports the median tokens per second of each, the median of the
pairs' ratios (quantized / FP; 1.0 = no overhead: a pair's ratio is measured under one load) and both
perplexities.

Timings are of the plain forward (``harness.evaluation.evaluate.perplexity``) with the whole model on the device;
a sweep's lazily loaded model evaluates block by block with the same quantizers.
"""
from __future__ import annotations

import copy
import gc
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from harness.data.windows import calibration_windows, eval_windows
from harness.errors import ConfigError
from harness.evaluation.evaluate import perplexity
from harness.method import QuantContext
from harness.models import load_model, resolve_device
from harness.runtime import torch_threads

log = logging.getLogger(__name__)

# what ``ptqbench bench`` measures unless told otherwise: the goal is a ratio of at least TARGET
DEFAULT_METHODS: tuple[Any, ...] = ("rtn", "smoothquant", "quarot")
DEFAULT_BITS: tuple[str, ...] = ("W4A4", "W4A4KV4")
TARGET = 0.95
# wall: elapsed seconds; cpu: the process's CPU seconds (all its threads), which leave out the time other
# processes hold the cores (on a shared machine at one thread, the steadier measure)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class BenchRow:
    """One method at one bit spec: FP and quantized throughput (median of the repeats) and perplexity."""

    method: str
    spec: str
    tokens: int  # per timed pass
    fp_tokens_per_s: float
    quant_tokens_per_s: float
    fp_ppl: float
    quant_ppl: float
    ratio: float  # the median over the repeats of quantized / FP tokens per second of one pair of passes


def bench_config(model: str, methods: Sequence[Any], bits: Sequence[str], *, windows: int, seqlen: int,
                 dataset: str, calibration_samples: int, calibration_seqlen: int, device: str, threads: int | None,
                 seed: int = 0) -> dict[str, Any]:
    """The one-model sweep (as YAML would give it) whose runs the bench times."""
    return {"name": "bench", "models": [model], "methods": list(methods), "bits": list(bits), "seed": seed,
            "device": device, "threads": threads,
            "calibration": {"dataset": dataset, "samples": calibration_samples, "seqlen": calibration_seqlen},
            "evaluation": {"ppl": {"datasets": [dataset], "seqlen": seqlen, "max_windows": windows}}}


def bench_throughput(model: str = "smollm2-135m", methods: Sequence[Any] = DEFAULT_METHODS,
                     bits: Sequence[str] = DEFAULT_BITS, *, windows: int = 4, seqlen: int = 512, repeats: int = 3,
                     dataset: str = "brown", calibration_samples: int = 4, calibration_seqlen: int = 512,
                     device: str = "auto", threads: int | None = None, seed: int = 0, clock: str = "wall") -> list[BenchRow]:
    """Time every (method, bit spec) run of the sweep ``bench_config`` describes; one row each, in plan order.

    ``methods``: sweep ``methods:`` entries (a name, or ``{name: ..., <options>, bits: [...], quant: {...}}``);
    ``bits``: the sweep's bit specs. The config is validated whole before the model loads (a bad entry is one
    ``ConfigError`` line). ``clock``: what a pass's seconds are (``CLOCKS``).
    """
    from harness.run.config import parse_config
    from harness.run.execute import plan

    config = parse_config(bench_config(model, methods, bits, windows=windows, seqlen=seqlen, dataset=dataset,
                                       calibration_samples=calibration_samples, calibration_seqlen=calibration_seqlen,
                                       device=device, threads=threads, seed=seed), "bench")
    runs = [r for r in plan(config) if not r.method_class.is_baseline]
    if clock not in CLOCKS:
        raise ConfigError(f"clock: {clock!r} is not allowed; use one of {', '.join(CLOCKS)}")
    now = CLOCKS[clock]
    dev = resolve_device(device)
    rows = []
    with torch_threads(threads):
        loaded = load_model(model, device=device, seed=seed)
        fp_model = loaded.model.to(dev)
        data = eval_windows(dataset, loaded.tokenizer, seqlen, windows)
        tokens = data.numel()

        def timed(m: torch.nn.Module) -> tuple[float, float]:
            start = now()
            ppl = perplexity(m, data, device=dev, progress=False)
            return tokens / (now() - start), ppl

        for run in runs:
            quant_model = copy.deepcopy(fp_model).cpu()
            calib = None
            if run.calibration is not None:
                c = run.calibration
                calib = calibration_windows(c.dataset, loaded.tokenizer, c.samples, c.seqlen, run.seed)
            torch.manual_seed(run.seed)  # as the sweep: the method's randomness starts from the seed
            log.info("bench: quantizing %s", run.label)
            result = run.method_class(run.config).apply(quant_model, run.bits, calib,
                                                        QuantContext(device=dev, seed=run.seed, progress=False))
            quant_model = result.model.to(dev)
            timed(fp_model), timed(quant_model)  # warm-up: allocator, kernels, caches
            fp, quant = [], []
            for i in range(repeats):  # pairs in turn FP first and quantized first, so a trend in the load cancels
                first, second = (fp, quant) if i % 2 == 0 else (quant, fp)
                first.append(timed(fp_model if first is fp else quant_model))
                second.append(timed(fp_model if second is fp else quant_model))
            rows.append(BenchRow(run.method, run.bits.name, tokens, statistics.median(t for t, _ in fp),
                                 statistics.median(t for t, _ in quant), fp[0][1], quant[0][1],
                                 statistics.median(q / f for (f, _), (q, _) in zip(fp, quant))))
            log.info("bench: %s %s ratio %.3f", run.method, run.bits.name, rows[-1].ratio)
            del quant_model, result
            gc.collect()
    return rows
