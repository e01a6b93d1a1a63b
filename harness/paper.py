"""Our results beside the published ones: QLLM (arXiv 2310.08041) Table 1 and its training cost.

The published numbers are package data, ``harness/reference/qllm.yaml``. Our runs map onto the
paper's cells by (model, method, bit spec, metric): the paper's FP16 column is our baseline run
(whatever method the sweep used as its baseline, ``Method.is_baseline``), its rows
are our zoo names (hub ids of the zoo map too), and its WikiText-2 / C4 / Avg columns are our
``ppl wikitext2`` / ``ppl c4`` / zero-shot accuracy averaged over exactly the paper's five tasks.
Every cell both have shows ours, published and the difference (ours - published); a published
cell we have not run shows the published value with a dagger. Used by
``ptqbench report DIR --reference paper``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import pandas as pd
import yaml

from harness.bits import BitSpec
from harness.errors import ConfigError
from harness.frame import quantize_hours, zeroshot_average
from harness.models import ZOO
from harness.record import RunRecord
from harness.tables import BASELINE, MISSING, Table, best_mask

log = logging.getLogger(__name__)

# Package data (pyproject [tool.setuptools.package-data]), so it ships with a plain `pip install .`.
REFERENCE_FILE: Any = resources.files("harness") / "reference" / "qllm.yaml"
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
    tc = data["training_cost"]
    cost = [{"model": m, "zoo": data["models"][m], "method": method, "bits": tc["bits"], "gpu_hours": float(h)}
            for m, hours in tc["rows"].items() for method, h in hours.items()]
    baseline = next(c["method"] for c in columns if c.get("baseline"))
    return Reference(data["source"], data["table"], pd.DataFrame(cells), tuple(data.get("notes", [])),
                     tuple(data["zeroshot_tasks"]), int(data["ppl_seqlen"]), pd.DataFrame(cost), tc["table"], tc["device"],
                     baseline)


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


def _ours(records: list[RunRecord], ref: Reference) -> dict[tuple[str, str, str], RunRecord]:
    """Our runs on the paper's models keyed (paper model, method, bits); the latest run of a key wins.

    Our baseline runs take the method name of the paper's FP16 column.
    """
    ours: dict[tuple[str, str, str], RunRecord] = {}
    for r in sorted(records, key=lambda r: r.finished_at):
        model = paper_model(r.model, ref)
        if model is None:
            continue
        key = (model, ref.baseline_method if r.baseline else r.method, r.bits)
        if key in ours:
            log.warning("%s %s %s: several runs (other options?); showing the latest", *key)
        ours[key] = r
    return ours


def comparison_frame(records: list[RunRecord], ref: Reference | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Side-by-side frame (ours, paper, Δ per metric), a bool frame marking published-only cells,
    and the footnotes that the ``note`` column refers to as ``[1]``, ``[2]``, ..."""
    ref = ref or load_reference()
    ours = _ours(records, ref)
    published = {(c.model, c.method, c.bits, c.metric): c.value for c in ref.cells.itertuples()}
    models = list(dict.fromkeys(ref.cells["model"]))
    paper_order = list(dict.fromkeys(zip(ref.cells["method"], ref.cells["bits"])))
    keys = set(ours) | {k[:3] for k in published}
    keys = sorted(keys, key=lambda k: (models.index(k[0]),
                                       paper_order.index(k[1:]) if k[1:] in paper_order else len(paper_order),
                                       BitSpec.parse(k[2]).order_key, k[1]))
    rows, marks, footnotes = [], [], []
    for model, method, bits in keys:
        record = ours.get((model, method, bits))
        mine = _our_values(record, ref) if record else {}
        row, mark = {"model": model, "method": method, "bits": bits, BASELINE: method == ref.baseline_method}, {}
        for metric, label in LABELS.items():
            a, b = mine.get(metric), published.get((model, method, bits, metric))
            row[f"{label} ours"], row[f"{label} paper"] = a, b
            row[f"{label} Δ"] = a - b if a is not None and b is not None else None
            mark[f"{label} paper"] = a is None and b is not None
        notes = [n["text"] for n in ref.notes
                 if all(n.get(k) in (None, v) for k, v in (("model", model), ("method", method), ("bits", bits)))]
        if record and (p := _protocol_note(record, ref)):
            notes.append(p)
        for text in notes:
            footnotes += [text] if text not in footnotes else []
        row["note"] = " ".join(f"[{footnotes.index(t) + 1}]" for t in notes) or None
        rows.append(row)
        marks.append(mark)
    frame = pd.DataFrame(rows)
    marked = pd.DataFrame(marks, index=frame.index).reindex(columns=frame.columns, fill_value=False).fillna(False).astype(bool)
    return frame, marked, [f"[{i}] {text}" for i, text in enumerate(footnotes, 1)]


def cost_frame(records: list[RunRecord], ref: Reference | None = None) -> pd.DataFrame:
    ref = ref or load_reference()
    ours = _ours(records, ref)
    rows = []
    for c in ref.cost.itertuples():
        record = ours.get((c.model, c.method, c.bits))
        hours = quantize_hours(record) if record else None
        rows.append({"model": c.model, "method": c.method, "bits": c.bits, "GPU-h ours": hours, "GPU-h paper": c.gpu_hours,
                     "GPU-h Δ": hours - c.gpu_hours if hours is not None else None,
                     "our device": record.cost["device"] if record else None})
    return pd.DataFrame(rows)


def tables(records: list[RunRecord], ref: Reference | None = None) -> list[Table]:
    """The comparison table and the training-cost table, ready for any format."""
    ref = ref or load_reference()
    frame, marked, footnotes = comparison_frame(records, ref)
    dirs = {f"{LABELS[m]} {side}": d for m, d in DIRECTION.items() for side in ("ours", "paper")}
    notes = [f"Published: {ref.source}, {ref.table}. Δ = ours − published. {MISSING}: not measured / not reported.",
             "† published value; we have not run this cell.",
             "Bold: best per column among quantized methods of the same model and bit spec (FP16 excluded): "
             "lowest perplexity, highest average accuracy.",
             f"Avg: mean accuracy (%) over {', '.join(ref.tasks)}.", *footnotes]
    comparison = Table(frame, f"Ours vs published ({ref.table} of arXiv 2310.08041)",
                       best=best_mask(frame, dirs), marked=marked, notes=notes, mark_label="published only")
    cost = cost_frame(records, ref)
    cost_notes = [f"Published: {ref.cost_table}, on {ref.cost_device}. Ours: device-hours of the calibrate + quantize "
                  "phases of the run, on the device named (hours on different hardware are not directly comparable).",
                  "Bold: fewest hours per model."]
    cost_table = Table(cost, "Training cost vs published", best=best_mask(cost, {"GPU-h ours": "min", "GPU-h paper": "min"}),
                       notes=cost_notes)
    return [comparison, cost_table]
