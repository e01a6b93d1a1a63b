"""Comparison reports from a results directory: one row per model x method x bit spec.

Columns and row order come from the data layer, ``harness.frame``: perplexity per dataset, the
zero-shot average, then cost (device, wall time per phase, device-hours, peak memory); the
baseline first, then methods in name order, bit specs from most to fewest bits.

Formats (``harness.tables``): Markdown, CSV, LaTeX and a self-contained HTML page with plots
(``harness.htmlpage``). Best values are bold per column within each model and bit spec, among
quantized methods (never the baseline): lowest perplexity, highest accuracy, fewest device-hours, least peak memory.
With ``reference="paper"`` the published QLLM Table 1 numbers are put beside ours
(``harness.paper``). Run: ``ptqbench report DIR [--format md|csv|tex|html] [--reference paper]``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness import paper
from harness.errors import ConfigError
from harness.frame import directions, results_frame
from harness.htmlpage import page
from harness.results import ResultStore
from harness.tables import MISSING, RENDERERS, Table, best_mask, to_markdown

FORMATS = ("md", "csv", "html", "tex")
REFERENCES = ("paper",)
__all__ = ["FORMATS", "REFERENCES", "results_table", "report"]


def results_table(frame: pd.DataFrame, title: str, compact: bool = True, failed: int = 0) -> Table:
    """The results as a ``Table``; ``compact`` moves a device shared by all runs into a note; ``failed`` runs are counted."""
    failed_note = [f"{failed} failed run(s) are not shown; their errors are in failed/."] if failed else []
    if frame.empty:
        return Table(pd.DataFrame(columns=["model", "method", "bits"]), title,
                     notes=["No finished runs in this directory.", *failed_note])
    notes = failed_note
    if compact and frame["device"].nunique(dropna=False) == 1 and frame["device"].notna().all():
        notes.append(f"All runs on {frame['device'].iloc[0]}; device-h = wall time x devices.")
        frame = frame.drop(columns=["device"])  # the same long name on every row only widens the table
    notes.append(f"Bold: best per column among quantized methods of the same model and bit spec "
                 f"(lowest perplexity, device-hours and peak memory; highest accuracy); {MISSING}: not measured.")
    return Table(frame, title, best=best_mask(frame, directions(frame.columns)), notes=notes)


def report(results_dir: str | Path, fmt: str = "md", title: str | None = None, reference: str | None = None) -> str:
    """The report of a results directory; ``reference="paper"`` adds the published numbers beside ours."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not allowed; use one of {FORMATS}")
    if reference is not None and reference not in REFERENCES:
        raise ConfigError(f"--reference: {reference!r} is not allowed; use one of {REFERENCES}")
    store = ResultStore(results_dir)
    # One rule: a folder a sweep wrote into (runs/ or failed/, even empty) reports, anything else is a mistake.
    if not store.runs.is_dir() and not store.failed.is_dir():
        raise ConfigError(f"DIR: {str(results_dir)!r} holds no results (no runs/ or failed/ folder)")
    records = list(store.records())
    title = title or f"ptqbench results: {Path(results_dir).name}"
    frame = results_frame(records)
    failed = len(list(store.failed.glob("*.json")))
    tables = [results_table(frame, "Results", compact=fmt != "csv", failed=failed)]
    if reference == "paper":
        tables += paper.tables(records)
        if fmt == "csv":  # one CSV holds one table: the side-by-side comparison
            return RENDERERS["csv"](tables[1])
    if fmt == "html":
        return page(title, tables, records=records)
    if fmt == "csv":
        return RENDERERS["csv"](tables[0])
    if fmt == "md":
        return f"# {title}\n\n" + "\n".join(to_markdown(t, level=2) for t in tables)
    return "\n".join(RENDERERS["tex"](t) for t in tables)
