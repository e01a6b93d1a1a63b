"""One run of a sweep: what decides it (``RunSpec``), how a sweep expands into runs (``plan``), and
how a run executes (``execute``: model -> calibration -> method -> evaluation -> ``RunRecord``).

``execute`` is a pure function of its ``RunSpec`` (it loads its own model and data), so an executor
can ship it to a Ray worker or a Slurm job; the sweep driver (``harness.sweep``) stores what comes back.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

import torch

from harness import schema
from harness.bits import FP, BitSpec
from harness.config import CalibrationConfig, EvaluationConfig, SweepConfig
from harness.costs import CostMeter
from harness.data import calibration_windows
from harness.evaluate import evaluate_model
from harness.method import Method, MethodConfig, QuantContext
from harness.models import load_model, resolve_device
from harness.record import RunRecord
from harness.registry import REGISTRY, get_method
from harness.results import run_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides one run's result, parsed and typed."""

    model: str
    method: str
    config: MethodConfig  # the method's options
    bits: BitSpec
    calibration: CalibrationConfig | None  # None for methods that use no data
    evaluation: EvaluationConfig
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    @property
    def method_class(self) -> type[Method]:
        return get_method(self.method)

    def identity(self) -> dict[str, Any]:
        """What the run key hashes: every field that can change the result (not ``trust_remote_code``)."""
        ident = {
            "model": self.model, "method": self.method, "options": self.config.to_dict(), "bits": self.bits.to_dict(),
            "calibration": schema.to_dict(self.calibration), "evaluation": schema.to_dict(self.evaluation),
            "seed": self.seed, "dtype": self.dtype,
            "device": resolve_device(self.device).type,  # "auto" on a GPU box and "cuda" are the same run
        }
        if not self.evaluation.zeroshot.tasks:  # runs without zero-shot keep the keys they had before it existed
            ident["evaluation"].pop("zeroshot")
        else:  # logging lm-eval's samples changes no number
            ident["evaluation"]["zeroshot"].pop("log_samples")
        return ident

    @property
    def key(self) -> str:
        return run_key(self.identity())

    @property
    def label(self) -> str:
        return f"{self.model} {self.method} {self.bits.name}"


def _baseline(config: SweepConfig) -> tuple[str, MethodConfig]:
    """The sweep's reference method: the first baseline it lists (a plugin's, say), else the registry's default."""
    for entry in config.methods:
        if entry.method_class.is_baseline:
            return entry.name, entry.config
    cls = REGISTRY.default_baseline()
    return cls.name, cls.config_class()


def plan(config: SweepConfig) -> list[RunSpec]:
    """Every run of the sweep: per model the baseline once (at W16A16), then each method at each of its bit specs."""
    runs: list[RunSpec] = []
    common = dict(evaluation=config.evaluation, seed=config.seed, device=config.device, dtype=config.dtype,
                  trust_remote_code=config.trust_remote_code)
    baseline, baseline_config = _baseline(config)
    for model in config.models:
        runs.append(RunSpec(model, baseline, baseline_config, FP, None, **common))
        for entry in config.methods:
            cls = entry.method_class
            if cls.is_baseline:
                continue
            calibration = config.calibration if cls.needs_calibration else None
            for spec in entry.bits or config.bits:
                runs.append(RunSpec(model, entry.name, entry.config, spec, calibration, **common))
    unique = {r.key: r for r in runs}  # a method listed twice with the same options runs once
    return list(unique.values())


def execute(run: RunSpec, progress: bool = True) -> RunRecord:
    """Run one quantize-and-evaluate job and return its record (token streams are cached by ``harness.data``)."""
    device = resolve_device(run.device)
    cls = run.method_class
    method = cls(run.config)
    started = dt.datetime.now(dt.timezone.utc)
    torch.manual_seed(run.seed)
    with CostMeter(device) as meter:
        with meter.phase("load"):
            loaded = load_model(run.model, dtype=run.dtype, device=run.device, seed=run.seed, trust_remote_code=run.trust_remote_code)
        calib = None
        if run.calibration is not None:
            c = run.calibration
            with meter.phase("calibrate"):
                calib = calibration_windows(c.dataset, loaded.tokenizer, c.samples, c.seqlen, run.seed)
        with meter.phase("quantize"):
            result = method.quantize(loaded.model, run.bits, calib, QuantContext(device=device, seed=run.seed, progress=progress))
        model = result.model.to(device)
        with meter.phase("evaluate"):
            metrics = evaluate_model(model, loaded.tokenizer, run.evaluation, device=device, label=run.label, progress=progress)
        samples = metrics.get("zeroshot", {}).pop("samples", {})
    return RunRecord(
        key=run.key, model=run.model, model_source=loaded.source, method=run.method, baseline=cls.is_baseline,
        options=run.config.to_dict(), bits=run.bits.name, bit_spec=run.bits.to_dict(),
        calibration=schema.to_dict(run.calibration), evaluation=schema.to_dict(run.evaluation), seed=run.seed,
        metrics=metrics, stats=result.stats, cost=meter.summary(),
        started_at=started.isoformat(), finished_at=dt.datetime.now(dt.timezone.utc).isoformat(), samples=samples,
    )
