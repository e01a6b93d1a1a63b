"""Evaluate a saved model (an export, a compressed-tensors folder, any HF model or zoo name) like a sweep run.

    record = evaluate_saved("exports/rtn-w4a16", EvaluationConfig(), device="cpu")

The metrics come from ``harness.evaluation.evaluate.evaluate_model``, the code a sweep's runs use, and the
result is a ``RunRecord`` a results directory and ``ptqbench report`` take as they are. For a
ptqbench export the record names the run it came from (model, method, options, bit spec, from
``ptqbench_export.json``), so it sits in the same report row group as the sweep's own runs; any other
model is recorded as method ``pretrained`` at ``W16A16``.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from harness import schema
from harness.bits import FP
from harness.evaluation.evaluate import evaluate_model
from harness.export.loader import export_info, is_quantized_export, load_quantized
from harness.models import load_model, resolve_device
from harness.evaluation.config import EvaluationConfig
from harness.run.costs import CostMeter
from harness.run.provenance import provenance
from harness.run.record import RunRecord
from harness.run.results import run_key

PRETRAINED = "pretrained"  # the method of a model that did not come from a ptqbench run


def _load(target: str, dtype: str, device: str, seed: int) -> tuple[Any, Any, str]:
    if is_quantized_export(target):
        from transformers import AutoTokenizer

        # an export comes back as the run's quantized model (ptqbench's quantizers, the run's attention kernel)
        return load_quantized(target), AutoTokenizer.from_pretrained(target), f"ptqbench export {Path(target).resolve()}"
    loaded = load_model(target, dtype=dtype, device=device, seed=seed)
    return loaded.model, loaded.tokenizer, loaded.source


def evaluate_saved(target: str, evaluation: EvaluationConfig, *, device: str = "auto", dtype: str = "auto", seed: int = 0,
                   progress: bool = True) -> RunRecord:
    """Load ``target`` and evaluate it per ``evaluation``; the record's key hashes target and settings."""
    dev = resolve_device(device)
    path = Path(target).expanduser()
    name = str(path.resolve()) if path.exists() else target
    source = export_info(path).get("source", {}) if path.is_dir() else {}
    ident = {"evaluated": name, "evaluation": schema.to_dict(evaluation), "seed": seed, "dtype": dtype, "device": dev.type}
    ident["evaluation"]["zeroshot"].pop("log_samples")
    started = dt.datetime.now(dt.timezone.utc)
    with CostMeter(dev) as meter:
        with meter.phase("load"):
            model, tokenizer, model_source = _load(name, dtype, device, seed)
        model = model.to(dev)
        with meter.phase("evaluate"):
            metrics = evaluate_model(model, tokenizer, evaluation, device=dev, label=f"eval {target}", progress=progress)
    samples = metrics.get("zeroshot", {}).pop("samples", {})
    return RunRecord(
        key=run_key(ident), model=source.get("model", name), model_source=model_source,
        method=source.get("method", PRETRAINED), options=source.get("options", {}), bits=source.get("bits", FP.name),
        bit_spec=source.get("bit_spec", FP.to_dict()), calibration=source.get("calibration"),
        evaluation=schema.to_dict(evaluation), seed=seed, metrics=metrics,
        stats={"evaluated": name, "export": export_info(path) if path.is_dir() else {}}, cost=meter.summary(),
        started_at=started.isoformat(), finished_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        provenance=provenance(), samples=samples,
    )
