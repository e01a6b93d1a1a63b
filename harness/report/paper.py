"""Our results beside the published ones: QLLM's (arXiv 2310.08041) LLaMA-1 and LLaMA-2 tables and its training
cost, and QuaRot's (arXiv 2404.00456) LLaMA-2 W4A4KV4 perplexities.

The published numbers are package data, ``harness/report/reference/*.yaml`` (one file per paper, each its own
table with its own source line and metrics). Our runs map onto the
paper's cells by (model, method, bit spec, metric): the paper's FP16 column is our baseline run
(whatever method the sweep used as its baseline, ``Method.is_baseline``), its rows
are our zoo names (hub ids of the zoo map too), and its WikiText-2 / C4 / Avg columns are our
``ppl_wikitext2`` / ``ppl_c4`` / zero-shot accuracy averaged over exactly the paper's five tasks.
Every cell both have shows ours, published and the difference (ours - published); a published
cell we have not run shows the published value with a dagger. With several seeds, ours is the mean
± std over the seeds, and ``within`` says whether the published number lies in that interval
(|mean - published| <= std); a summary line counts the cells that reproduce. Used by
``ptqbench report DIR --reference paper``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import pandas as pd
import yaml

from harness.bits import BitSpec
from harness.errors import ConfigError
from harness.models import ZOO
from harness.report.frame import quantize_hours, variant_label, zeroshot_average
from harness.report.tables import BASELINE, MISSING, Table, best_mask, bold_note
from harness.run.record import RunRecord

log = logging.getLogger(__name__)

# Package data (pyproject [tool.setuptools.package-data]), so it ships with a plain `pip install .`.
REFERENCE_FILE: Any = resources.files("harness.report") / "reference" / "qllm.yaml"
QUAROT_FILE: Any = resources.files("harness.report") / "reference" / "quarot.yaml"
LABELS = {"wikitext2": "WikiText-2", "c4": "C4", "avg": "Avg"}
DIRECTION = {"wikitext2": "min", "c4": "min", "avg": "max"}


@dataclass(frozen=True)
class Reference:
    source: str
    table: str
    cells: pd.DataFrame  # model (paper name), zoo, method, bits, metric, value
    notes: tuple[dict, ...]
    tasks: tuple[str, ...]
    ppl_seqlen: int
    cost: pd.DataFrame  # model, zoo, method, bits, gpu_hours
    cost_table: str
    cost_device: str
    baseline_method: str  # the method name the reference gives its FP16 column
    cost_caveat: str = ""  # how far the cost numbers were checked, printed under the cost table
    metrics: tuple[str, ...] = ("wikitext2", "c4", "avg")  # the metrics the paper's cells hold
    paper: str = "QLLM, arXiv 2310.08041"  # the short name in the table's title


def _number(text: str, where: str) -> float | None:
    text = text.strip()
    if text == "-":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number or '-'") from None


@cache
def load_reference(path: Any = REFERENCE_FILE) -> Reference:
    """Parse the published tables; every cell becomes one long-form row (missing ones are dropped)."""
    if not path.is_file():
        raise ConfigError(f"--reference: the published numbers {str(path)!r} are missing from this installation")
    data = yaml.safe_load(path.read_text())
    metrics, columns = data["metrics"], data["columns"]
    cells = []
    for model, row in data["rows"].items():
        if len(row) != len(columns):
            raise ConfigError(f"{path.name}: rows.{model} has {len(row)} cells; expected {len(columns)}")
        for col, cell in zip(columns, row):
            parts = str(cell).split("/")
            if len(parts) != len(metrics):
                raise ConfigError(f"{path.name}: rows.{model} {col['label']}: {cell!r} needs {len(metrics)} values")
            for metric, text in zip(metrics, parts):
                value = _number(text, f"{path.name}: rows.{model} {col['label']}")
                if value is not None:
                    cells.append({"model": model, "zoo": data["models"][model], "method": col["method"],
                                  "bits": col["bits"], "metric": metric, "value": value})
    tc = data.get("training_cost") or {"rows": {}, "table": "", "device": ""}
    cost = [{"model": m, "zoo": data["models"][m], "method": method, "bits": tc["bits"], "gpu_hours": float(h)}
            for m, hours in tc["rows"].items() for method, h in hours.items()]
    baseline = next(c["method"] for c in columns if c.get("baseline"))
    return Reference(data["source"], data["table"], pd.DataFrame(cells), tuple(data.get("notes", [])),
                     tuple(data.get("zeroshot_tasks", ())), int(data["ppl_seqlen"]), pd.DataFrame(cost), tc["table"],
                     tc["device"], baseline, str(tc.get("caveat", "")), tuple(metrics), str(data.get("paper", "")))


def paper_model(name: str, ref: Reference) -> str | None:
    """The paper's row name for a model given as a zoo name or its hub id; None if not in the paper."""
    by_zoo = dict(zip(ref.cells["zoo"], ref.cells["model"]))
    if name in by_zoo:
        return by_zoo[name]
    for zoo_name, entry in ZOO.items():
        if entry.hub_id and entry.hub_id.lower() == name.lower() and zoo_name in by_zoo:
            return by_zoo[zoo_name]
    return None


def _our_values(record: RunRecord, ref: Reference) -> dict[str, float | None]:
    return {"wikitext2": record.ppl.get("wikitext2"), "c4": record.ppl.get("c4"), "avg": zeroshot_average(record, ref.tasks)}


def _protocol_note(record: RunRecord, ref: Reference) -> str | None:
    """Say so when our perplexity was not measured like the paper's (full test set, 2048 tokens)."""
    p = record.evaluation["ppl"]
    if not set(record.ppl) & {"wikitext2", "c4"}:
        return None
    if p["seqlen"] != ref.ppl_seqlen or p["max_windows"] is not None:
        windows = f", first {p['max_windows']} windows" if p["max_windows"] else ""
        return f"ours: ppl at {p['seqlen']} tokens{windows} (paper: {ref.ppl_seqlen}, all)"
    return None


def _ours(records: list[RunRecord], ref: Reference) -> dict[tuple[str, str, str], list[RunRecord]]:
    """Our runs on the paper's models keyed (paper model, method, bits): one run per seed (the latest of a
    seed), of one option set (the variant of the latest run, when several were run).

    Our baseline runs take the method name of the paper's FP16 column.
    """
    runs: dict[tuple[str, str, str], dict[str, dict[int, RunRecord]]] = {}
    latest: dict[tuple[str, str, str], str] = {}
    for r in sorted(records, key=lambda r: r.finished_at):
        model = paper_model(r.model, ref)
        if model is None:
            continue
        key = (model, ref.baseline_method if r.baseline else r.method, r.bits)
        variant = variant_label(r.method, r.options)
        runs.setdefault(key, {}).setdefault(variant, {})[r.seed] = r
        latest[key] = variant
    for key, variants in runs.items():
        if len(variants) > 1:
            log.warning("%s %s %s: runs with %d option sets; showing the latest (%s)", *key, len(variants), latest[key] or "defaults")
    return {key: list(variants[latest[key]].values()) for key, variants in runs.items()}


def within_spread(mean: float | None, std: float | None, published: float | None) -> bool | None:
    """Whether the published number lies within our mean ± std (one sample std over seeds, ddof 1).

    ``None`` (undecided) without a published number, without ours, or without a spread (one run).
    One std, not two: a published value outside the interval the table prints is not called reproduced.
    """
    if mean is None or published is None or std is None or math.isnan(std):
        return None
    return abs(mean - published) <= std


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (None when no value; NaN std for a single value)."""
    if not values:
        return None, None
    series = pd.Series(values, dtype=float)
    return float(series.mean()), float(series.std(ddof=1))


def comparison_frame(records: list[RunRecord], ref: Reference | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]:
    """Side-by-side frame (n, then per metric: ours (the mean over seeds), paper, Δ, within), a bool frame
    marking published-only cells, a frame of our stds (same shape; NaN where one run or none), and the
    footnotes that the ``note`` column refers to as ``[1]``, ``[2]``, ..."""
    ref = ref or load_reference()
    ours = _ours(records, ref)
    published = {(c.model, c.method, c.bits, c.metric): c.value for c in ref.cells.itertuples()}
    models = list(dict.fromkeys(ref.cells["model"]))
    paper_order = list(dict.fromkeys(zip(ref.cells["method"], ref.cells["bits"])))
    keys = set(ours) | {k[:3] for k in published}
    keys = sorted(keys, key=lambda k: (models.index(k[0]),
                                       paper_order.index(k[1:]) if k[1:] in paper_order else len(paper_order),
                                       BitSpec.parse(k[2]).order_key, k[1]))
    rows, marks, spreads, footnotes = [], [], [], []
    for model, method, bits in keys:
        runs = ours.get((model, method, bits), [])
        mine = [_our_values(r, ref) for r in runs]
        row = {"model": model, "method": method, "bits": bits, BASELINE: method == ref.baseline_method, "n": len(runs) or None}
        mark, spread = {}, {}
        for metric, label in ((m, LABELS[m]) for m in ref.metrics):
            a, std = _stats([v[metric] for v in mine if v[metric] is not None])
            b = published.get((model, method, bits, metric))
            row[f"{label} ours"], row[f"{label} paper"] = a, b
            row[f"{label} Δ"] = a - b if a is not None and b is not None else None
            inside = within_spread(a, std, b)
            row[f"{label} within"] = None if inside is None else ("yes" if inside else "no")
            mark[f"{label} paper"] = a is None and b is not None
            spread[f"{label} ours"] = std
        notes = [n["text"] for n in ref.notes
                 if all(n.get(k) in (None, v) for k, v in (("model", model), ("method", method), ("bits", bits)))]
        if runs and (p := _protocol_note(runs[-1], ref)):
            notes.append(p)
        for text in notes:
            footnotes += [text] if text not in footnotes else []
        row["note"] = " ".join(f"[{footnotes.index(t) + 1}]" for t in notes) or None
        rows.append(row)
        marks.append(mark)
        spreads.append(spread)
    frame = pd.DataFrame(rows)
    if not frame["n"].notna().any() or (frame["n"].fillna(1) <= 1).all():  # one seed: no n and no within columns
        frame = frame.drop(columns=["n", *(f"{LABELS[m]} within" for m in ref.metrics)])
    marked = pd.DataFrame(marks, index=frame.index).reindex(columns=frame.columns, fill_value=False).fillna(False).astype(bool)
    spread = pd.DataFrame(spreads, index=frame.index, dtype=float).reindex(columns=frame.columns)
    return frame, marked, spread, [f"[{i}] {text}" for i, text in enumerate(footnotes, 1)]


def reproduced_summary(frame: pd.DataFrame) -> str | None:
    """``k of m cells reproduce``: published values within our mean ± std, over the cells with a spread."""
    columns = [c for c in frame.columns if c.endswith(" within")]
    if not columns:
        return None
    verdicts = frame[columns].stack()
    yes, decided = int((verdicts == "yes").sum()), int(verdicts.isin(["yes", "no"]).sum())
    return (f"Reproduced: {yes} of {decided} cells with several seeds have the published value within our mean ± std "
            "(within: |mean − published| <= std, sample std over seeds); cells of one run are not counted.")


def cost_frame(records: list[RunRecord], ref: Reference | None = None) -> pd.DataFrame:
    ref = ref or load_reference()
    ours = _ours(records, ref)
    rows = []
    for c in ref.cost.itertuples():
        runs = ours.get((c.model, c.method, c.bits), [])
        hours, _ = _stats([h for r in runs if (h := quantize_hours(r)) is not None])
        rows.append({"model": c.model, "method": c.method, "bits": c.bits, "GPU-h ours": hours, "GPU-h paper": c.gpu_hours,
                     "GPU-h Δ": hours - c.gpu_hours if hours is not None else None,
                     "our device": runs[-1].cost["device"] if runs else None})
    return pd.DataFrame(rows)


def tables(records: list[RunRecord]) -> list[Table]:
    """Every reference's comparison table (QLLM's, then QuaRot's) and QLLM's training-cost table, ready for any format."""
    return [*reference_tables(records, load_reference()), *reference_tables(records, load_reference(QUAROT_FILE))]


def reference_tables(records: list[RunRecord], ref: Reference) -> list[Table]:
    """One reference's comparison table, and its training-cost table when it has one."""
    frame, marked, spread, footnotes = comparison_frame(records, ref)
    has_spread = bool(spread.notna().to_numpy().any())
    dirs = {f"{LABELS[m]} {side}": d for m, d in DIRECTION.items() for side in ("ours", "paper")}
    notes = [f"Published: {ref.source}, {ref.table}. Δ = ours − published. {MISSING}: not measured / not reported.",
             "† published value; we have not run this cell.",
             bold_note(has_spread, criteria="FP16 excluded; lowest perplexity, highest average accuracy"),
             *([f"Avg: mean accuracy (%) over {', '.join(ref.tasks)}."] if "avg" in ref.metrics else [])]
    if has_spread:
        notes.insert(1, "ours: mean ± std over seeds (n runs); within: the published value lies in ours ± std.")
        notes.append(reproduced_summary(frame))
    comparison = Table(frame, f"Ours vs published ({ref.table} of {ref.paper})",
                       best=best_mask(frame, dirs, spread=spread if has_spread else None), marked=marked,
                       notes=[*notes, *footnotes], mark_label="published only", spread=spread if has_spread else None)
    if ref.cost.empty:
        return [comparison]
    cost = cost_frame(records, ref)
    cost_notes = [f"Published: {ref.cost_table}, on {ref.cost_device}. Ours: device-hours of the calibrate + quantize "
                  "phases of the run (mean over seeds), on the device named (hours on different hardware are not directly comparable).",
                  "Bold: fewest hours per model.", *([ref.cost_caveat] if ref.cost_caveat else [])]
    cost_table = Table(cost, "Training cost vs published", best=best_mask(cost, {"GPU-h ours": "min", "GPU-h paper": "min"}),
                       notes=cost_notes)
    return [comparison, cost_table]
