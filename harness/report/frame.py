"""Results as pandas frames: the tidy per-run frame, and its aggregate over seeds.

The data layer under every report, plot, paper table and export (``harness.report.render`` composes them)::

    runs = tidy_frame(ResultStore("runs/demo").records())   # one row per run
    cells = aggregate(runs)                                  # one row per model x method x variant x bits

``tidy_frame`` columns (snake_case, units in the names, NaN where not measured): ``run_key``,
``model``, ``method``, ``variant`` (the options that differ from the method's defaults, e.g.
``theta=ratio, assembly=false``; empty for defaults), ``bits``, ``seed``, ``baseline`` (the run's
method is the sweep's reference, ``Method.is_baseline``: never a competitor for bold), ``ppl_<dataset>``,
each zero-shot task's compared metric ``<task>_<acc|acc_norm>_pct`` and ``zeroshot_avg_pct``, then
cost: ``wall_s``, ``load_s``, ``calibrate_s``, ``quantize_s``, ``evaluate_s``, ``device_hours``,
``quantize_device_hours``, ``peak_memory_gib``, ``device``. Rows: model, the baseline first, methods
by name, variants, bit specs from most to fewest bits (``BitSpec.order_key``), seeds.

``aggregate`` groups runs that differ only in their seed: ``n`` (runs), ``seeds``, and per metric
``<metric>_mean`` and ``<metric>_std`` (sample standard deviation, ddof 1; NaN when n = 1: one run
has no spread).
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from harness.bits import BitSpec
from harness.errors import ConfigError, PtqbenchError
from harness.registry import get_method
from harness.run.record import RunRecord
from harness.run.results import ResultStore

log = logging.getLogger(__name__)

ZS_AVG = "zeroshot_avg_pct"
PHASES = {"load": "load_s", "calibrate": "calibrate_s", "quantize": "quantize_s", "evaluate": "evaluate_s"}
BASELINE = "baseline"  # the frame's bool column
KEYS = ("model", "method", "variant", "bits")  # what a row of the aggregate is; runs within one differ by seed
SEED_INDEPENDENT = "seed_independent"  # the frame's bool column: one run stands for every seed (Method.seed_independent)
LABELS = ("run_key", *KEYS, "seed", BASELINE, SEED_INDEPENDENT, "device")  # the non-metric columns of the tidy frame


def _scores(tasks: dict[str, dict]) -> dict[str, float]:
    """Each task's compared metric (the ``metric`` the run recorded: acc or acc_norm), as a fraction."""
    out = {}
    for task, entry in tasks.items():
        value = entry.get(entry["metric"]) if "metric" in entry else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[task] = float(value)
    return out


def zeroshot_average(record: RunRecord, tasks: Iterable[str] | None = None) -> float | None:
    """Mean accuracy in percent of the compared metric over all scored tasks, or over exactly ``tasks``.

    ``None`` when a task asked for is missing, so a partial average is never shown as the paper's
    five-task one.
    """
    values = _scores(record.zeroshot_tasks)
    wanted = list(tasks) if tasks is not None else list(values)
    if not wanted or any(t not in values for t in wanted):
        return None
    return 100.0 * sum(values[t] for t in wanted) / len(wanted)


def quantize_hours(record: RunRecord) -> float | None:
    """Device-hours of calibration + quantization (the papers' "training cost")."""
    return record.cost.get("quantize_device_hours")


def _option_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # YAML-like: true, null, 0.5, [1, 2]


def variant_label(method: str, options: dict[str, Any]) -> str:
    """The options that differ from ``method``'s defaults, in the config's field order (``""`` for defaults).

    A method that is not installed any more has unknown defaults: then every option is listed, so
    runs with different options still never fall into one row.
    """
    try:
        defaults = get_method(method).config_class().to_dict()
    except PtqbenchError:
        defaults = {}
    order = list(defaults) + sorted(k for k in options if k not in defaults)
    return ", ".join(f"{k}={_option_text(options[k])}" for k in order if k in options and options[k] != defaults.get(k, object()))


def _snake(name: str) -> str:
    """A dataset or task name as part of a column name (paths and dashes become underscores)."""
    return re.sub(r"\W+", "_", name).strip("_").lower()


def _row(r: RunRecord) -> dict[str, Any]:
    row: dict[str, Any] = {"run_key": r.key, "model": r.model, "method": r.method, "variant": variant_label(r.method, r.options),
                           "bits": r.bits, "seed": r.seed, BASELINE: r.baseline,
                           SEED_INDEPENDENT: bool(r.provenance.get(SEED_INDEPENDENT, False))}
    for name, value in r.ppl.items():
        row[f"ppl_{_snake(name)}"] = value
    for task, entry in r.zeroshot_tasks.items():
        if task in (scores := _scores({task: entry})):
            row[f"{_snake(task)}_{entry['metric']}_pct"] = 100 * scores[task]
    row[ZS_AVG] = zeroshot_average(r)
    cost = r.cost
    row["wall_s"] = cost["wall_s"]
    for phase, column in PHASES.items():
        row[column] = cost["phases_s"].get(phase)
    row["device_hours"] = cost["device_hours"]
    row["quantize_device_hours"] = cost.get("quantize_device_hours")
    peak = cost.get("peak_memory_bytes")
    row["peak_memory_gib"] = peak / 2**30 if peak is not None else None
    row["device"] = cost["device"]  # last: long names (and device-hours are per device)
    return row


def _sorted(frame: pd.DataFrame, by_seed: bool) -> pd.DataFrame:
    order = frame["bits"].map(lambda b: BitSpec.parse(b).order_key)
    frame = frame.assign(_competitor=~frame[BASELINE].astype(bool), _order=order)
    keys = ["model", "_competitor", "method", "variant", "_order"] + (["seed"] if by_seed else [])
    return frame.sort_values(keys, kind="stable").drop(columns=["_competitor", "_order"]).reset_index(drop=True)


def tidy_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """One row per run (numeric columns stay numeric; missing = NaN); see the module docstring."""
    frame = pd.DataFrame([_row(r) for r in records])
    if frame.empty:
        return pd.DataFrame(columns=list(LABELS))
    if frame[ZS_AVG].isna().all():  # no zero-shot evaluation in this sweep: no empty column
        frame = frame.drop(columns=[ZS_AVG])
    frame = frame[[c for c in frame.columns if c != "device"] + ["device"]]
    for column in metric_columns(frame):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return _sorted(frame, by_seed=True)


def load_records(results_dir: str | Path) -> list[RunRecord]:
    """The finished runs of a results directory (``ConfigError`` when it is not one).

    One rule: a folder a sweep wrote into (runs/ or failed/, even empty) is a results directory;
    a corrupt result in it is skipped with a warning naming the file (``ResultStore.records``).
    """
    store = ResultStore(results_dir)
    if not store.runs.is_dir() and not store.failed.is_dir():
        raise ConfigError(f"DIR: {str(results_dir)!r} holds no results (no runs/ or failed/ folder)")
    return list(store.records())


def load_frame(results_dir: str | Path) -> pd.DataFrame:
    """``tidy_frame`` of a results directory's finished runs: what ``load_results`` gives a notebook."""
    return tidy_frame(load_records(results_dir))


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The measured columns of a tidy frame (everything but the labels), in frame order."""
    return [c for c in frame.columns if c not in LABELS]


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof 1) and ``n`` over the seeds of each model x method x variant x bits.

    Columns: ``model``, ``method``, ``variant``, ``bits``, ``baseline``, ``n``, ``seeds`` ("0,1,2"),
    ``<metric>_mean`` and ``<metric>_std`` per metric column, ``device`` (the devices, "; "-joined).
    A metric missing in some runs is averaged over the runs that have it; NaN where none has it.
    """
    metrics = metric_columns(frame)
    columns = [*KEYS, BASELINE, SEED_INDEPENDENT, "n", "seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "std")),
               "device"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for keys, group in frame.groupby(list(KEYS), sort=False, dropna=False):
        row = dict(zip(KEYS, keys))
        row[BASELINE] = bool(group[BASELINE].astype(bool).any())
        row[SEED_INDEPENDENT] = bool(group[SEED_INDEPENDENT].astype(bool).all())
        row["n"] = len(group)
        if group["seed"].duplicated().any():  # same seed twice: runs differing in calibration or evaluation settings
            log.warning("%s: %d runs but seeds %s; they differ in settings other than the options (calibration, "
                        "evaluation) and are averaged together", " ".join(str(k) for k in keys if k), len(group),
                        sorted(group["seed"]))
        row["seeds"] = ",".join(str(s) for s in sorted(group["seed"]))
        for m in metrics:
            values = group[m].astype(float)
            row[f"{m}_mean"] = values.mean()  # NaN-skipping
            # NaN for a single value (no spread); exactly 0 for equal values (pandas' sum leaves float noise, 1e-13)
            row[f"{m}_std"] = 0.0 if len(values) > 1 and values.nunique() == 1 else values.std(ddof=1)
        row["device"] = "; ".join(dict.fromkeys(str(d) for d in group["device"] if isinstance(d, str)))
        rows.append(row)
    return _sorted(pd.DataFrame(rows, columns=columns), by_seed=False)


def means_and_spreads(agg: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split an ``aggregate`` into a frame of means under the metric names and the matching frame of stds."""
    metrics = [c.removesuffix("_mean") for c in agg.columns if c.endswith("_mean")]
    labels = [c for c in agg.columns if not c.endswith(("_mean", "_std"))]
    means = agg[labels].copy()
    spreads = pd.DataFrame(float("nan"), index=agg.index, columns=labels)
    for m in metrics:
        means[m] = agg[f"{m}_mean"]
        spreads[m] = agg[f"{m}_std"]
    order = [c for c in labels if c != "device"] + metrics + (["device"] if "device" in labels else [])
    return means[order], spreads[order]


def directions(columns: Iterable[str]) -> dict[str, str]:
    """Which way is better for each column of a results frame (columns not named are never bold)."""
    out = {}
    for c in columns:
        if c.startswith("ppl_") or c in ("device_hours", "peak_memory_gib"):
            out[c] = "min"
        elif c.endswith("_pct"):
            out[c] = "max"
    return out
