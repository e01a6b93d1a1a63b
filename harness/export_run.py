"""Export a stored run: rebuild its ``RunSpec`` from the result JSON, quantize again, write the folder.

    export_run(find_record("3f2a9c...", "runs/demo"), "exports/qllm-w4a4")

Results hold numbers, not weights, so the model is quantized again from the stored config (model,
method options, bit spec, calibration, seed, dtype, device). On CPU every method is deterministic,
so the export is the model that was evaluated; on CUDA, trained methods (bf16 autocast, atomics)
can differ in the last bits. Why not save every run's weights during the sweep: a sweep of 13 runs
of a 7B model would write ~13 x 4-13 GB nobody asked for, Ray and Slurm workers would have to ship
them back to the driver, and results stored before this feature existed could never be exported.
The rebuilt spec's key is compared with the stored key, so a config that no longer reproduces the
run (a changed default, another device) is reported, not exported silently.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from harness import schema
from harness.config import CalibrationConfig, EvaluationConfig
from harness.data import calibration_windows
from harness.errors import PtqbenchError
from harness.execute import RunSpec
from harness.export import ExportResult, check_target, export_model
from harness.method import QuantContext
from harness.models import load_model, resolve_device
from harness.record import RunRecord
from harness.registry import get_method
from harness.results import ResultStore

log = logging.getLogger(__name__)


def find_record(run: str, results: str | Path | None = None) -> RunRecord:
    """``run`` is a result JSON path, or a run key looked up in ``results`` (default: every results dir under runs/)."""
    path = Path(run)
    if path.suffix == ".json" and path.is_file():
        return ResultStore(path.parent.parent).read(path)
    roots = [Path(results)] if results is not None else sorted(Path("runs").glob("*"))
    hits = [root / "runs" / f"{run}.json" for root in roots if (root / "runs" / f"{run}.json").is_file()]
    if not hits:
        where = results if results is not None else "runs/*"
        raise PtqbenchError(f"RUN: {run!r} is neither a result JSON file nor a run key stored in {where}/runs/")
    if len(hits) > 1:
        raise PtqbenchError(f"RUN: key {run} is stored in {len(hits)} results dirs ({', '.join(map(str, hits))}); pass --results DIR")
    return ResultStore(hits[0].parent.parent).read(hits[0])


def spec_from_record(record: RunRecord, device: str | None = None) -> RunSpec:
    """The ``RunSpec`` that produced ``record`` (device and dtype from its provenance unless ``device`` is given)."""
    config = record.provenance.get("config", {})
    cls = get_method(record.method)
    return RunSpec(
        model=record.model, method=record.method, config=cls.config_class.from_dict(record.options, "options"),
        bits=record.spec, calibration=schema.from_dict(CalibrationConfig, record.calibration, "calibration") if record.calibration else None,
        evaluation=schema.from_dict(EvaluationConfig, record.evaluation, "evaluation"), seed=record.seed,
        device=device or config.get("device", record.cost.get("device_type", "auto")), dtype=config.get("dtype", "auto"),
        trust_remote_code=bool(config.get("trust_remote_code", False)), attention_kernel=config.get("attention_kernel", "sdpa"),
    )


def source_of(record: RunRecord) -> dict[str, Any]:
    """What ``ptqbench_export.json`` says about the run an export came from (``ptqbench eval`` reads it back)."""
    return {"key": record.key, "model": record.model, "method": record.method, "options": record.options,
            "bits": record.bits, "bit_spec": record.bit_spec, "calibration": record.calibration, "seed": record.seed,
            "metrics": {"ppl": record.ppl}}


def export_run(record: RunRecord, out: str | Path, *, device: str | None = None, progress: bool = True,
               overwrite: bool = False) -> ExportResult:
    """Quantize ``record``'s run again and export the model to ``out``."""
    check_target(out, overwrite)  # before minutes of quantization, not after
    run = spec_from_record(record, device)
    if run.key != record.key:
        log.warning("the rebuilt run's key %s differs from the stored %s (another device, or defaults changed since); "
                    "exporting what the stored options give now", run.key, record.key)
    torch.manual_seed(run.seed)
    loaded = load_model(run.model, dtype=run.dtype, device=run.device, seed=run.seed, trust_remote_code=run.trust_remote_code,
                        attention_kernel=run.attention_kernel)
    calib = None
    if run.calibration is not None:
        c = run.calibration
        calib = calibration_windows(c.dataset, loaded.tokenizer, c.samples, c.seqlen, run.seed)
    context = QuantContext(device=resolve_device(run.device), seed=run.seed, progress=progress)
    result = run.method_class(run.config).quantize(loaded.model, run.bits, calib, context)
    return export_model(result.model.cpu(), loaded.tokenizer, out, source=source_of(record), overwrite=overwrite)
