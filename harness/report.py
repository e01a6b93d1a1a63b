"""Comparison reports from a results directory: one row per model x method x bit spec.

Columns: perplexity per dataset, the zero-shot average, then cost (device, wall time per phase,
device-hours, peak memory). Rows are ordered model, then FP first, then methods in name order,
then bit specs from most to fewest bits.

Formats (``harness.tables``): Markdown, CSV, LaTeX and a self-contained HTML page with plots
(``harness.htmlpage``). Best values are bold per column within each model and bit spec, among
quantized methods: lowest perplexity, highest accuracy, fewest device-hours, least peak memory.
With ``reference="paper"`` the published QLLM Table 1 numbers are put beside ours
(``harness.paper``). Run: ``ptqbench report DIR [--format md|csv|tex|html] [--reference paper]``.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from harness.errors import ConfigError
from harness.results import ResultStore
from harness.tables import MISSING, RENDERERS, Table, best_mask, to_markdown

FORMATS = ("md", "csv", "html", "tex")
REFERENCES = ("paper",)
ZS_AVG = "zero-shot avg"
PHASES = {"load": "load s", "calibrate": "calib s", "quantize": "quant s", "evaluate": "eval s"}
__all__ = ["FORMATS", "MISSING", "REFERENCES", "ZS_AVG", "results_frame", "results_table", "render", "report"]


def zeroshot_average(metrics: dict, tasks: Iterable[str] | None = None) -> float | None:
    """Mean accuracy in percent over ``metrics["zeroshot"]`` (all tasks, or exactly ``tasks``).

    A task's value is a number or a mapping holding its compared ``metric`` (default ``acc``); values <= 1 are fractions (the
    lm-eval convention) and are scaled to percent like the papers' tables. ``None`` when a task
    asked for is missing, so a partial average is never shown as the paper's five-task one.
    """
    scores = metrics.get("zeroshot") or {}
    if isinstance(scores, dict) and isinstance(scores.get("tasks"), dict):
        scores = scores["tasks"]
    values = {}
    for task, value in scores.items():
        value = value.get(value.get("metric", "acc")) if isinstance(value, dict) else value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[task] = float(value)
    wanted = list(tasks) if tasks is not None else list(values)
    if not wanted or any(t not in values for t in wanted):
        return None
    picked = [values[t] for t in wanted]
    scale = 100.0 if all(v <= 1.0 for v in picked) else 1.0
    return scale * sum(picked) / len(picked)


def results_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Flatten result records into one row per run (numeric columns stay numeric; missing = NaN)."""
    rows = []
    for r in records:
        row = {"model": r["model"], "method": r["method"], "bits": r["bits"],
               "w_bits": r["bit_spec"]["w_bits"], "a_bits": r["bit_spec"]["a_bits"]}
        for name, value in r.get("metrics", {}).get("ppl", {}).items():
            row[f"ppl {name}"] = value
        metrics = r.get("metrics", {})
        for task, entry in ((metrics.get("zeroshot") or {}).get("tasks") or {}).items():
            metric = entry.get("metric", "acc")  # each task's compared metric (acc or acc_norm), in %
            if isinstance(entry.get(metric), (int, float)):
                row[f"{task} {metric}"] = 100 * entry[metric]
        row[ZS_AVG] = zeroshot_average(metrics)
        cost = r.get("cost", {})
        row["wall s"] = cost.get("wall_s")
        for phase, column in PHASES.items():
            row[column] = cost.get("phases_s", {}).get(phase)
        row["device-h"] = cost.get("device_hours")
        row["peak mem GiB"] = cost["peak_memory_bytes"] / 2**30 if cost.get("peak_memory_bytes") is not None else None
        row["device"] = cost.get("device")  # last: long names (and device-hours are per device)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    if frame[ZS_AVG].isna().all():  # no zero-shot evaluation in this sweep: no empty column
        frame = frame.drop(columns=[ZS_AVG])
    frame["_fp"] = frame["method"] != "fp"
    frame = frame.sort_values(["model", "_fp", "method", "w_bits", "a_bits"], ascending=[True, True, True, False, False])
    return frame.drop(columns=["_fp", "w_bits", "a_bits"]).reset_index(drop=True)


def directions(columns: Iterable[str]) -> dict[str, str]:
    """Which way is better for each column of a results frame (columns not named are never bold)."""
    out = {}
    for c in columns:
        if c.startswith("ppl ") or c in ("device-h", "peak mem GiB"):
            out[c] = "min"
        elif c == ZS_AVG or c.startswith("acc ") or c.endswith((" acc", " acc_norm")):
            out[c] = "max"
    return out


def results_table(frame: pd.DataFrame, title: str, compact: bool = True) -> Table:
    """The results as a ``Table``; ``compact`` moves a device shared by all runs into a note."""
    if frame.empty:
        return Table(pd.DataFrame(columns=["model", "method", "bits"]), title,
                     notes=["No finished runs in this directory (failed runs, if any, are in failed/)."])
    notes = []
    if compact and frame["device"].nunique(dropna=False) == 1 and frame["device"].notna().all():
        notes.append(f"All runs on {frame['device'].iloc[0]}; device-h = wall time x devices.")
        frame = frame.drop(columns=["device"])  # the same long name on every row only widens the table
    notes.append(f"Bold: best per column among quantized methods of the same model and bit spec "
                 f"(lowest perplexity, device-hours and peak memory; highest accuracy); {MISSING}: not measured.")
    return Table(frame, title, best=best_mask(frame, directions(frame.columns)), notes=notes)


def render(frame: pd.DataFrame, fmt: str, title: str = "ptqbench results") -> str:
    """One results table in one format (the HTML of ``report`` also has plots)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not allowed; use one of {FORMATS}")
    table = results_table(frame, title, compact=fmt != "csv")
    if fmt == "md":
        return to_markdown(table, level=1)
    if fmt == "html":
        from harness.htmlpage import page

        return page(title, [table])
    return RENDERERS[fmt](table)


def report(results_dir: str | Path, fmt: str = "md", title: str | None = None, reference: str | None = None) -> str:
    """The report of a results directory; ``reference="paper"`` adds the published numbers beside ours."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not allowed; use one of {FORMATS}")
    if reference is not None and reference not in REFERENCES:
        raise ConfigError(f"--reference: {reference!r} is not allowed; use one of {REFERENCES}")
    store = ResultStore(results_dir)
    if not store.runs.is_dir():
        raise ConfigError(f"DIR: {str(results_dir)!r} holds no results (no runs/ folder)")
    records = list(store.records())
    title = title or f"ptqbench results: {Path(results_dir).name}"
    frame = results_frame(records)
    tables = [results_table(frame, "Results", compact=fmt != "csv")]
    if reference == "paper":
        from harness import paper

        tables += paper.tables(records)
        if fmt == "csv":  # one CSV holds one table: the side-by-side comparison
            return RENDERERS["csv"](tables[1])
    if fmt == "html":
        from harness.htmlpage import page

        return page(title, tables, records=records)
    if fmt == "csv":
        return RENDERERS["csv"](tables[0])
    if fmt == "md":
        return f"# {title}\n\n" + "\n".join(to_markdown(t, level=2) for t in tables)
    return "\n".join(RENDERERS["tex"](t) for t in tables)
