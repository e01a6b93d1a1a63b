"""Comparison reports from a results directory: pivot tables per metric, then one row per model x
method x variant x bit spec.

Data come from ``harness.report.frame``: the tidy per-run frame and its aggregate over seeds. Runs that
differ only in their seed are one row whose cells read ``mean ± std`` (with an ``n`` column); a
sweep with one seed reads as plain numbers. First a pivot table per metric (perplexity per dataset,
zero-shot average; rows method + variant, columns bit specs, like a paper's table), then the long
table with every metric and cost (device, wall time per phase, device-hours, peak memory).

Formats (``harness.report.tables``): Markdown, LaTeX, a self-contained HTML page with plots
(``harness.report.htmlpage``), and the tidy per-run frame as CSV (empty cells for missing values) or
Parquet. Bold marks the best value per column within each model and bit spec, among quantized
methods (never the baseline), with the spread rule of ``harness.report.tables.best_mask`` when cells
aggregate several seeds. With ``reference="paper"`` the published QLLM numbers (LLaMA-1 and LLaMA-2 tables) are put
beside ours (``harness.report.paper``).
Run: ``ptqbench report DIR [--format md|csv|tex|html|parquet] [-o FILE] [--reference paper]``.
"""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from harness.bits import bits_order
from harness.errors import ConfigError
from harness.report import paper
from harness.report.frame import (
    BASELINE,
    SEED_INDEPENDENT,
    ZS_AVG,
    aggregate,
    directions,
    load_records,
    means_and_spreads,
    tidy_frame,
)
from harness.report.htmlpage import page
from harness.report.tables import MISSING, RENDERERS, Table, best_mask, bold_note, to_markdown
from harness.run.results import ResultStore

FORMATS = ("md", "csv", "html", "tex", "parquet")
REFERENCES = ("paper",)
PIVOT_LABELS = ("model", "method", "variant")
__all__ = ["FORMATS", "REFERENCES", "pivot_tables", "results_table", "report", "report_bytes", "tidy_csv",
           "tidy_parquet"]


def _spread_note(agg: pd.DataFrame) -> list[str]:
    if not (agg["n"] > 1).any():
        return []
    counts = sorted(set(agg["n"]))
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    notes = [f"Cells: mean ± std over seeds (sample std, ddof 1; n = {n} runs per row); a cell of one run shows its value alone."]
    shared = list(dict.fromkeys(agg.loc[agg[SEED_INDEPENDENT].astype(bool), "method"]))
    if shared:
        notes.append(f"{', '.join(shared)}: the seed cannot change {'it' if len(shared) == 1 else 'them'} (no calibration "
                     "data, no randomness), so one run, at the first seed, stands for every seed (n = 1).")
    return notes


def results_table(agg: pd.DataFrame, title: str, compact: bool = True, failed: int = 0) -> Table:
    """The aggregated results as a ``Table``; ``compact`` moves a device shared by all runs into a note; ``failed`` runs are counted."""
    failed_note = [f"{failed} failed run(s) are not shown; their errors are in failed/."] if failed else []
    if agg.empty:
        return Table(pd.DataFrame(columns=["model", "method", "variant", "bits"]), title,
                     notes=["No finished runs in this directory.", *failed_note])
    frame, spread = means_and_spreads(agg)
    drop = ["seeds", SEED_INDEPENDENT, "quantize_device_hours"] + ([] if (agg["n"] > 1).any() else ["n"])
    notes = failed_note
    if compact and agg["device"].nunique(dropna=False) == 1 and (agg["device"] != "").all():
        notes.append(f"All runs on {agg['device'].iloc[0]}; device_hours = wall time x devices.")
        drop.append("device")  # the same long name on every row only widens the table
    frame, spread = frame.drop(columns=drop, errors="ignore"), spread.drop(columns=drop, errors="ignore")
    has_spread = bool(spread.notna().to_numpy().any())
    notes += _spread_note(agg)
    notes.append(bold_note(has_spread) + f" variant: the options that differ from the method's defaults. {MISSING}: not measured.")
    best = best_mask(frame, directions(frame.columns), spread=spread if has_spread else None)
    return Table(frame, title, best=best, notes=notes, spread=spread if has_spread else None)


def _pivot_metrics(agg: pd.DataFrame) -> list[str]:
    means, _ = means_and_spreads(agg)
    return [c for c in directions(means.columns) if (c.startswith("ppl_") or c == ZS_AVG) and means[c].notna().any()]


def _wide(agg: pd.DataFrame, values: pd.Series, bits: list[str]) -> pd.DataFrame:
    """``values`` (one per row of ``agg``) laid out with rows model + method + variant (in ``agg``'s order), columns ``bits``."""
    long = agg[[*PIVOT_LABELS, "bits"]].assign(_value=values.to_numpy(dtype=float))
    wide = long.pivot(index=list(PIVOT_LABELS), columns="bits", values="_value")
    order = pd.MultiIndex.from_frame(agg[list(PIVOT_LABELS)].drop_duplicates())
    return wide.reindex(index=order, columns=bits)


def pivot_tables(agg: pd.DataFrame) -> list[Table]:
    """One table per headline metric: rows model + method + variant, columns bit specs (most bits first)."""
    if agg.empty:
        return []
    bits = bits_order(set(agg["bits"]))
    means, spreads = means_and_spreads(agg)
    baseline = agg.groupby(list(PIVOT_LABELS), sort=False)[BASELINE].any()
    tables = []
    for metric in _pivot_metrics(agg):
        value = _wide(agg, means[metric], bits)
        frame = value.assign(**{BASELINE: baseline.reindex(value.index).to_numpy()}).reset_index()
        frame = frame[[*PIVOT_LABELS, BASELINE, *bits]]
        frame.columns.name = None
        spread = _wide(agg, spreads[metric], bits).reset_index(drop=True).reindex(columns=frame.columns)
        has_spread = bool(spread[bits].notna().to_numpy().any())
        direction = directions([metric])[metric]
        best = best_mask(frame, {c: direction for c in bits}, group=("model",), spread=spread if has_spread else None)
        rule = bold_note(has_spread, "model, per bit-spec column", "lowest" if direction == "min" else "highest")
        tables.append(Table(frame, f"{metric} by method and bit spec", best=best, notes=[*_spread_note(agg), rule],
                            spread=spread if has_spread else None))
    return tables


def tidy_csv(frame: pd.DataFrame) -> str:
    """The tidy per-run frame as CSV: full precision, empty cells for missing values (``pd.read_csv`` reads it back)."""
    return frame.to_csv(index=False)


def tidy_parquet(frame: pd.DataFrame) -> bytes:
    """The tidy per-run frame as Parquet bytes (needs pyarrow)."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def _check(fmt: str, reference: str | None) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not allowed; use one of {FORMATS}")
    if reference is not None and reference not in REFERENCES:
        raise ConfigError(f"--reference: {reference!r} is not allowed; use one of {REFERENCES}")
    if fmt == "parquet" and reference is not None:
        raise ConfigError("--reference: not available with --format parquet (the per-run frame only)")


def report_bytes(results_dir: str | Path) -> bytes:
    """``--format parquet``: the tidy per-run frame of ``results_dir``."""
    return tidy_parquet(tidy_frame(load_records(results_dir)))


def report(results_dir: str | Path, fmt: str = "md", title: str | None = None, reference: str | None = None) -> str:
    """The report of a results directory; ``reference="paper"`` adds the published numbers beside ours."""
    _check(fmt, reference)
    if fmt == "parquet":
        raise ConfigError("--format parquet: binary output; write it to a file with -o FILE.parquet")
    records = load_records(results_dir)
    frame = tidy_frame(records)
    if fmt == "csv":  # one CSV holds one table: the runs, or the side-by-side comparison
        return RENDERERS["csv"](paper.tables(records)[0]) if reference == "paper" else tidy_csv(frame)
    title = title or f"ptqbench results: {Path(results_dir).name}"
    agg = aggregate(frame)
    failed = len(list(ResultStore(results_dir).failed.glob("*.json")))
    tables = [*pivot_tables(agg), results_table(agg, "Results", failed=failed)]
    if reference == "paper":
        tables += paper.tables(records)
    if fmt == "html":
        return page(title, tables, records=records, frame=frame)
    if fmt == "md":
        return f"# {title}\n\n" + "\n".join(to_markdown(t, level=2) for t in tables)
    return "\n".join(RENDERERS["tex"](t) for t in tables)

