"""Comparison reports from a results directory: one row per model x method x bit spec.

Columns: perplexity per dataset, then cost (wall time, device-hours, peak memory). Rows are
ordered model, then FP first, then methods in sweep order, then bit specs from most to fewest bits.
Formats: Markdown, CSV, HTML, LaTeX (all through pandas).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from harness.errors import ConfigError
from harness.results import ResultStore

FORMATS = ("md", "csv", "html", "tex")
MISSING = "–"


def results_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Flatten result records into one row per run (numeric columns stay numeric; missing = NaN)."""
    rows = []
    for r in records:
        row = {"model": r["model"], "method": r["method"], "bits": r["bits"],
               "w_bits": r["bit_spec"]["w_bits"], "a_bits": r["bit_spec"]["a_bits"]}
        for name, value in r.get("metrics", {}).get("ppl", {}).items():
            row[f"ppl {name}"] = value
        if zs := r.get("metrics", {}).get("zeroshot"):  # accuracy in %, each task's compared metric
            for task, entry in zs["tasks"].items():
                row[f"{task} {entry['metric']}"] = 100 * entry[entry["metric"]]
            row["zero-shot avg"] = 100 * zs["average"] if zs.get("average") is not None else None
        cost = r.get("cost", {})
        row["wall s"] = cost.get("wall_s")
        row["device-h"] = cost.get("device_hours")
        row["peak mem GiB"] = cost["peak_memory_bytes"] / 2**30 if cost.get("peak_memory_bytes") is not None else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["_fp"] = frame["method"] != "fp"
    frame = frame.sort_values(["model", "_fp", "method", "w_bits", "a_bits"], ascending=[True, True, True, False, False])
    return frame.drop(columns=["_fp", "w_bits", "a_bits"]).reset_index(drop=True)


def _fmt(value: object, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float):
        if column == "device-h":
            return f"{value:.4f}"
        return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def render(frame: pd.DataFrame, fmt: str, title: str = "ptqbench results") -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not allowed; use one of {FORMATS}")
    if fmt == "csv":
        return frame.to_csv(index=False)
    shown = frame.copy()
    for column in shown.columns:
        shown[column] = [_fmt(v, column) for v in shown[column]]
    if fmt == "md":
        return f"# {title}\n\n" + shown.to_markdown(index=False) + "\n"
    if fmt == "html":
        return f"<!doctype html><meta charset='utf-8'><title>{title}</title><h1>{title}</h1>\n" + shown.to_html(index=False) + "\n"
    return shown.to_latex(index=False)


def report(results_dir: str | Path, fmt: str = "md", title: str | None = None) -> str:
    store = ResultStore(results_dir)
    if not store.runs.is_dir():
        raise ConfigError(f"DIR: {str(results_dir)!r} holds no results (no runs/ folder)")
    return render(results_frame(store.records()), fmt, title or f"ptqbench results: {Path(results_dir).name}")
