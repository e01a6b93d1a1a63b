"""Export a stored run: the model its sweep kept, or its ``RunSpec`` rebuilt from the result JSON and quantized again.

    path = locate("3f2a9c...", "runs/demo")
    export_run(ResultStore(path.parent.parent).read(path), "exports/qllm-w4a4", kept=kept_model("runs/demo", "3f2a9c..."))

A sweep with ``keep_quantized: true`` wrote each run's quantized model to ``<out>/quantized/<key>/``
in the export format; exporting such a run copies that folder (no second quantization). Otherwise
results hold numbers, not weights, so the model is quantized again from the stored config (model,
method options, bit spec, calibration, seed, dtype, device). On CPU every method is deterministic,
so the export is the model that was evaluated; on CUDA, trained methods (bf16 autocast, atomics)
can differ in the last bits. Why not save every run's weights during the sweep: a sweep of 13 runs
of a 7B model would write ~13 x 4-13 GB nobody asked for, Ray and Slurm workers would have to ship
them back to the driver, and results stored before this feature existed could never be exported.
The rebuilt spec's key, local inputs fingerprinted again as a sweep does, is compared with the
stored key, so a config that no longer reproduces the run (a changed model or data file, which the
line names, a changed default, another device) is reported, not exported silently.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from harness import schema
from harness.data.config import CalibrationConfig
from harness.data.windows import calibration_windows
from harness.errors import PtqbenchError
from harness.evaluation.config import EvaluationConfig
from harness.export.formats import INFO, ExportResult, folder_size
from harness.export.loader import export_info
from harness.export.writer import check_target, export_model, staged
from harness.method import QuantContext
from harness.models import load_model, resolve_device
from harness.registry import get_method
from harness.run.execute import RunSpec, local_inputs
from harness.run.record import RunRecord
from harness.run.results import ResultStore

log = logging.getLogger(__name__)


def locate(run: str, results: str | Path | None = None) -> Path:
    """The result JSON ``run`` names: a result JSON path, or a run key looked up in ``results`` (default: every
    results dir under runs/); one line naming RUN when there is none or several."""
    path = Path(run)
    if path.suffix == ".json" and path.is_file():
        return path
    roots = [Path(results)] if results is not None else sorted(Path("runs").glob("*"))
    hits = [root / "runs" / f"{run}.json" for root in roots if (root / "runs" / f"{run}.json").is_file()]
    if not hits:
        where = results if results is not None else "runs/*"
        raise PtqbenchError(f"RUN: {run!r} is neither a result JSON file nor a run key stored in {where}/runs/")
    if len(hits) > 1:
        raise PtqbenchError(f"RUN: key {run} is stored in {len(hits)} results dirs ({', '.join(map(str, hits))}); pass --results DIR")
    return hits[0]


def spec_from_record(record: RunRecord, device: str | None = None) -> RunSpec:
    """The ``RunSpec`` that produced ``record`` (device and dtype from its provenance unless ``device`` is given)."""
    config = record.provenance.get("config", {})
    cls = get_method(record.method)
    calibration = schema.from_dict(CalibrationConfig, record.calibration, "calibration") if record.calibration else None
    evaluation = schema.from_dict(EvaluationConfig, record.evaluation, "evaluation")
    return RunSpec(
        model=record.model, method=record.method, config=cls.config_class.from_dict(record.options, "options"),
        bits=record.spec, calibration=calibration, evaluation=evaluation, seed=record.seed,
        device=device or config.get("device", record.cost.get("device_type", "auto")), dtype=config.get("dtype", "auto"),
        trust_remote_code=bool(config.get("trust_remote_code", False)), attention_kernel=config.get("attention_kernel", "sdpa"),
        inputs=local_inputs(record.model, calibration, evaluation),  # fingerprinted now, as the sweep did then
    )


def key_check(run: RunSpec, record: RunRecord) -> str:
    """One line: the rebuilt run's key against the stored one, naming each local input that changed since."""
    if run.key == record.key:
        return f"same key {run.key}: the stored config and inputs rebuild the run"
    stored, now = record.provenance.get("inputs", {}), dict(run.inputs)
    changed = [f"{path} (was {stored.get(path)}, now {now.get(path)})" for path in sorted(set(stored) | set(now))
               if stored.get(path) != now.get(path)]
    why = (f"changed input: {'; '.join(changed)}" if changed
           else "another device, or defaults changed since the run")
    return f"the rebuilt run's key {run.key} differs from the stored {record.key} ({why}); exporting what the stored options give now"


def source_of(record: RunRecord) -> dict[str, Any]:
    """What ``ptqbench_export.json`` says about the run an export came from (``ptqbench eval`` reads it back)."""
    return {"key": record.key, "model": record.model, "method": record.method, "options": record.options,
            "bits": record.bits, "bit_spec": record.bit_spec, "calibration": record.calibration, "seed": record.seed,
            "metrics": {"ppl": record.ppl}}


def kept_model(results: str | Path, key: str) -> Path | None:
    """The folder a ``keep_quantized`` sweep kept for run ``key`` under ``results``, or None."""
    folder = ResultStore(results).quantized / key
    return folder if (folder / INFO).is_file() else None


def export_run(record: RunRecord, out: str | Path, *, device: str | None = None, progress: bool = True,
               overwrite: bool = False, kept: Path | None = None) -> ExportResult:
    """Export ``record``'s model to ``out``: a copy of ``kept`` when given, else the run quantized again."""
    out = check_target(out, overwrite)  # before minutes of quantization, not after
    if kept is not None:
        return copy_kept(kept, out, record)
    run = spec_from_record(record, device)
    line = key_check(run, record)
    if run.key == record.key:
        log.info(line)
    else:
        log.warning(line)
    loaded = load_model(run.model, dtype=run.dtype, device=run.device, seed=run.seed, trust_remote_code=run.trust_remote_code,
                        attention_kernel=run.attention_kernel)
    calib = None
    if run.calibration is not None:
        c = run.calibration
        calib = calibration_windows(c.dataset, loaded.tokenizer, c.samples, c.seqlen, run.seed)
    context = QuantContext(device=resolve_device(run.device), seed=run.seed, progress=progress)
    torch.manual_seed(run.seed)  # as the run's execute: right before the method
    result = run.method_class(run.config).apply(loaded.model, run.bits, calib, context)
    return export_model(result.model.cpu(), loaded.tokenizer, out, source=source_of(record), overwrite=overwrite)


def copy_kept(kept: Path, out: Path, record: RunRecord) -> ExportResult:
    """``kept`` (the sweep's ``keep_quantized`` folder) copied to ``out``, its source naming ``record``; atomic like an export."""
    info = export_info(kept)
    with staged(out) as tmp:
        shutil.copytree(kept, tmp, dirs_exist_ok=True)
        info["source"] = source_of(record)
        (tmp / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("exported %s from the model its sweep kept (%s): not quantized again", out, kept)
    return ExportResult(out, info["format"], folder_size(out), info.get("reason", ""))
