"""Quantize seconds of ptqbench's methods beside their official codes' (``ptqbench bench-methods``).

The official codes are not part of ptqbench: their seconds, measured once per setting on a named
machine with the method's official code patched only to run on CPU, are data in
``official_seconds.yaml`` (package data), each with its perplexity. The bench runs ptqbench's side
of each setting now, through the sweep's own path (``harness.run.execute``: the same loading,
calibration windows, method and evaluation as ``ptqbench run``), and prints the quantize phase's
seconds beside the official ones, with the ratio and its goal. Our perplexity is printed beside the
official one, so a table whose settings drifted apart shows it.

The ratio means something only on the machine, thread count and load the official seconds were
taken with (the file says which for each): two torch processes on the same cores slow each other
several-fold.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from harness.errors import ConfigError

OFFICIAL_FILE = Path(__file__).with_name("official_seconds.yaml")


@dataclass(frozen=True)
class OfficialTiming:
    """One setting timed with the official code: what ptqbench runs to match it, and what the official code gave."""

    method: str
    bits: str
    official: str  # repository, commit and entry point
    official_s: float  # the quantize seconds (calibration forward passes included, evaluation not)
    official_ppl: float
    goal: float  # the ratio ours / official to stay under
    threads: int  # torch threads of the official run; the bench runs ours with as many
    conditions: str  # what else ran on the machine meanwhile (ours must be timed alike)
    options: dict[str, Any] = field(default_factory=dict)
    quant: dict[str, Any] = field(default_factory=dict)
    attention_kernel: str = "sdpa"

    @property
    def label(self) -> str:
        return f"{self.method} {self.bits}"


@dataclass(frozen=True)
class OfficialSeconds:
    machine: str
    date: str
    model: str
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    timings: tuple[OfficialTiming, ...]


def load_official(path: Path = OFFICIAL_FILE) -> OfficialSeconds:
    data = yaml.safe_load(path.read_text())
    timings = tuple(OfficialTiming(**t) for t in data.pop("timings"))
    return OfficialSeconds(**data, timings=timings)


@dataclass(frozen=True)
class MethodSpeed:
    timing: OfficialTiming
    seconds: float  # ours, the quantize phase
    ppl: float  # ours

    @property
    def ratio(self) -> float:
        return self.seconds / self.timing.official_s


def sweep_config(reference: OfficialSeconds, timing: OfficialTiming, device: str = "cpu") -> dict[str, Any]:
    """The one-run sweep (as YAML would give it) that repeats ``timing``'s setting with ptqbench."""
    return {"name": "bench-methods", "device": device, "dtype": "float32", "models": [reference.model],
            "attention_kernel": timing.attention_kernel,
            "methods": [{"name": timing.method, **timing.options}], "bits": [timing.bits], "quant": dict(timing.quant),
            "calibration": dict(reference.calibration), "evaluation": dict(reference.evaluation)}


def select(reference: OfficialSeconds, methods: tuple[str, ...]) -> list[OfficialTiming]:
    """The timings of ``methods`` (every timing when empty); an unknown name is a one-line error."""
    known = sorted({t.method for t in reference.timings})
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"--methods: {', '.join(unknown)} has no official timing; use some of {', '.join(known)}")
    return [t for t in reference.timings if not methods or t.method in methods]


def bench_methods(methods: tuple[str, ...] = (), threads: int | None = None, progress: bool = True,
                  reference: OfficialSeconds | None = None) -> list[MethodSpeed]:
    """Run ptqbench's side of each official timing of ``methods``, one after the other, in this process, each with
    the official run's thread count (``threads`` overrides it)."""
    from harness.run.config import parse_config
    from harness.run.execute import execute, plan

    reference = reference or load_official()
    timings = select(reference, methods)
    results = []
    with tempfile.TemporaryDirectory(prefix="ptqbench-bench-") as work:  # never resume a timed run from a checkpoint
        for timing in timings:
            torch.set_num_threads(threads or timing.threads)
            (run,) = [r for r in plan(parse_config(sweep_config(reference, timing), "bench-methods"))
                      if r.method == timing.method]
            record = execute(replace(run, work_root=work), progress=progress)
            results.append(MethodSpeed(timing, record.cost["phases_s"]["quantize"],
                                       next(iter(record.metrics["ppl"].values()))))
    return results

