"""Run a sweep: plan the runs, execute each (model -> calibration -> method -> evaluation), store.

``plan()`` expands a ``SweepConfig`` into ``RunSpec``s: for every model the FP baseline once,
then every method at each of its bit specs. ``execute()`` is a pure function of one ``RunSpec``
(it loads its own model), so executors other than the local loop can ship it elsewhere.
``run_sweep()`` skips runs whose key is already stored, records failures and carries on.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from harness import schema
from harness.bits import FP, BitSpec
from harness.config import CalibrationConfig, EvaluationConfig, SweepConfig
from harness.costs import CostMeter
from harness.data import calibration_windows, eval_windows
from harness.evaluate import perplexity
from harness.method import QuantContext
from harness.models import load_model, resolve_device
from harness.registry import get_method
from harness.results import ResultStore, run_key, write_json_atomic, write_text_atomic
from harness.zeroshot import zeroshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides one run's result."""

    model: str
    method: str
    options: dict[str, Any]
    bits: BitSpec
    calibration: CalibrationConfig | None  # None for methods that use no data
    evaluation: EvaluationConfig
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def identity(self) -> dict[str, Any]:
        ident = schema.to_dict(self)
        ident.pop("trust_remote_code")
        ident["device"] = resolve_device(self.device).type  # "auto" on a GPU box and "cuda" are the same run
        if not self.evaluation.zeroshot.tasks:  # runs without zero-shot keep the keys they had before it existed
            ident["evaluation"].pop("zeroshot")
        return ident

    @property
    def key(self) -> str:
        return run_key(self.identity())

    @property
    def label(self) -> str:
        return f"{self.model} {self.method} {self.bits.name}"


def plan(config: SweepConfig) -> list[RunSpec]:
    runs: list[RunSpec] = []
    common = dict(evaluation=config.evaluation, seed=config.seed, device=config.device, dtype=config.dtype,
                  trust_remote_code=config.trust_remote_code)
    for model in config.models:
        runs.append(RunSpec(model, "fp", {}, FP, None, **common))
        for entry in config.methods:
            cls = get_method(entry.name)
            if cls.is_baseline:
                continue
            options = cls.config_class.from_dict(entry.options).to_dict()  # defaults made explicit in the key
            calibration = config.calibration if cls.needs_calibration else None
            for text in entry.bits or config.bits:
                runs.append(RunSpec(model, entry.name, options, config.bit_spec(text), calibration, **common))
    unique = {r.key: r for r in runs}  # a method listed twice with the same options runs once
    return list(unique.values())


@dataclass
class DataCache:
    """Token windows shared by the runs of one sweep (tokenizing a corpus once, not per run)."""

    _store: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def get(self, key: tuple, make: Any) -> torch.Tensor:
        if key not in self._store:
            self._store[key] = make()
        return self._store[key]


def execute(run: RunSpec, cache: DataCache | None = None, progress: bool = True) -> dict[str, Any]:
    """Run one quantize-and-evaluate job and return its result record."""
    cache = cache or DataCache()
    device = resolve_device(run.device)
    method = get_method(run.method).from_options(run.options)
    started = dt.datetime.now(dt.timezone.utc)
    torch.manual_seed(run.seed)
    with CostMeter(device) as meter:
        with meter.phase("load"):
            loaded = load_model(run.model, dtype=run.dtype, device=run.device, seed=run.seed, trust_remote_code=run.trust_remote_code)
        tok_id = loaded.tokenizer.name_or_path
        calib = None
        if run.calibration is not None:
            c = run.calibration
            with meter.phase("calibrate"):
                calib = cache.get(("calib", tok_id, c.dataset, c.samples, c.seqlen, run.seed),
                                  lambda: calibration_windows(c.dataset, loaded.tokenizer, c.samples, c.seqlen, run.seed))
        with meter.phase("quantize"):
            result = method.quantize(loaded.model, run.bits, calib, QuantContext(device=device, seed=run.seed, progress=progress))
        model = result.model.to(device)
        metrics: dict[str, Any] = {"ppl": {}}
        with meter.phase("evaluate"):
            p = run.evaluation.ppl
            for name in p.datasets:
                windows = cache.get(("eval", tok_id, name, p.seqlen, p.max_windows),
                                    lambda n=name: eval_windows(n, loaded.tokenizer, p.seqlen, p.max_windows))
                metrics["ppl"][name] = perplexity(model, windows, device=device, batch_size=p.batch_size,
                                                  desc=f"ppl {name} ({run.label})", progress=progress)
                metrics.setdefault("ppl_windows", {})[name] = len(windows)
            if run.evaluation.zeroshot.tasks:
                metrics["zeroshot"] = zeroshot(model, loaded.tokenizer, run.evaluation.zeroshot, device=device)
    return {
        "key": run.key,
        "status": "ok",
        "model": run.model,
        "model_source": loaded.source,
        "method": run.method,
        "options": run.options,
        "bits": run.bits.name,
        "bit_spec": run.bits.to_dict(),
        "calibration": schema.to_dict(run.calibration),
        "evaluation": schema.to_dict(run.evaluation),
        "seed": run.seed,
        "metrics": metrics,
        "stats": result.stats,
        "cost": meter.summary(),
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }


@dataclass
class SweepSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def run_sweep(config: SweepConfig, out_dir: str | Path, *, force: bool = False, progress: bool = True,
              executor: Any = None) -> SweepSummary:
    """Execute every planned run not already stored in ``out_dir`` (all of them with ``force``).

    ``config.executor`` decides where runs execute (``executor`` overrides it with a ready
    ``harness.executors`` instance); every result comes back here and is stored as it arrives.
    """
    from harness.executors import make_executor  # executors import this module

    store = ResultStore(out_dir)
    summary = SweepSummary()
    ex = executor or make_executor(config.executor, store.root, progress=progress)
    with ex:
        if config.device == "auto" and (device := ex.auto_device()):
            # A run's key names the device it executes on: a GPU worker's, not a CPU-only driver's.
            config = dataclasses.replace(config, device=device)
        runs = plan(config)
        write_json_atomic(store.root / "plan.json", [{"key": r.key, "label": r.label} for r in runs])
        write_text_atomic(store.root / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        todo = []
        for run in runs:
            if store.has(run.key) and not force:
                log.info("skip %s (done: runs/%s.json)", run.label, run.key)
                summary.skipped.append(run.key)
            else:
                todo.append(run)

        def done(run: RunSpec, record: dict) -> None:
            record["provenance"] = {**record.get("provenance", {}), "argv": sys.argv, "config": config.to_dict(),
                                    "seed": run.seed, "executor": ex.kind}
            store.write(run.key, record)
            summary.done.append(run.key)

        def failed(run: RunSpec, outcome: Any) -> None:
            log.error("run %s failed: %s", run.label, outcome.error)
            store.write_failure(run.key, {"key": run.key, "label": run.label, "error": outcome.error,
                                          "traceback": outcome.traceback, "run": schema.to_dict(run)})
            summary.failed[run.key] = outcome.error

        if todo:
            ex.run(todo, done, failed, desc=f"sweep {config.name}")
    return summary
