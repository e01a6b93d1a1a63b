"""Results as a pandas frame: one row per run, numeric columns, best-direction per column.

The data layer under every report, plot and paper table (``harness.report`` composes them)::

    frame = results_frame(ResultStore("runs/demo").records())

Columns: ``model``, ``method``, ``bits``, ``baseline`` (the run's method is the sweep's reference,
``Method.is_baseline``: never a competitor for bold), perplexity per dataset (``ppl <name>``), each
zero-shot task's compared metric in % and their average, then cost (wall and phase seconds,
device-hours, peak memory, the device). Rows: model, the baseline first, methods by name, bit
specs from most to fewest bits (``BitSpec.order_key``).
"""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from harness.bits import BitSpec
from harness.record import RunRecord

ZS_AVG = "zero-shot avg"
PHASES = {"load": "load s", "calibrate": "calib s", "quantize": "quant s", "evaluate": "eval s"}
BASELINE = "baseline"  # the frame's bool column


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


def results_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """Flatten records into one row per run (numeric columns stay numeric; missing = NaN)."""
    rows = []
    for r in records:
        row = {"model": r.model, "method": r.method, "bits": r.bits, BASELINE: r.baseline}
        for name, value in r.ppl.items():
            row[f"ppl {name}"] = value
        for task, entry in r.zeroshot_tasks.items():
            if task in (scores := _scores({task: entry})):
                row[f"{task} {entry['metric']}"] = 100 * scores[task]
        row[ZS_AVG] = zeroshot_average(r)
        cost = r.cost
        row["wall s"] = cost["wall_s"]
        for phase, column in PHASES.items():
            row[column] = cost["phases_s"].get(phase)
        row["device-h"] = cost["device_hours"]
        peak = cost.get("peak_memory_bytes")
        row["peak mem GiB"] = peak / 2**30 if peak is not None else None
        row["device"] = cost["device"]  # last: long names (and device-hours are per device)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    if frame[ZS_AVG].isna().all():  # no zero-shot evaluation in this sweep: no empty column
        frame = frame.drop(columns=[ZS_AVG])
    order = frame["bits"].map(lambda b: BitSpec.parse(b).order_key)
    frame = frame.assign(_competitor=~frame[BASELINE].astype(bool), _order=order)
    frame = frame.sort_values(["model", "_competitor", "method", "_order"], kind="stable")
    return frame.drop(columns=["_competitor", "_order"]).reset_index(drop=True)


def directions(columns: Iterable[str]) -> dict[str, str]:
    """Which way is better for each column of a results frame (columns not named are never bold)."""
    out = {}
    for c in columns:
        if c.startswith("ppl ") or c in ("device-h", "peak mem GiB"):
            out[c] = "min"
        elif c == ZS_AVG or c.endswith((" acc", " acc_norm")):
            out[c] = "max"
    return out
