"""Our results beside the published ones: QLLM (arXiv 2310.08041) Table 1 and its training cost.

The published numbers are data in ``reports/reference/qllm.yaml``. Our runs map onto the paper's
cells by (model, method, bit spec, metric): the paper's FP16 row is our ``fp`` method, its rows
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
from pathlib import Path

import pandas as pd
import yaml

from harness.bits import BitSpec
from harness.errors import ConfigError
from harness.models import ZOO
from harness.report import zeroshot_average
from harness.tables import MISSING, Table, best_mask

log = logging.getLogger(__name__)

REFERENCE_FILE = Path(__file__).resolve().parent.parent / "reports" / "reference" / "qllm.yaml"
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


def _number(text: str, where: str) -> float | None:
    text = text.strip()
    if text == "-":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number or '-'") from None


@cache
def load_reference(path: Path = REFERENCE_FILE) -> Reference:
    """Parse the published tables; every cell becomes one long-form row (missing ones are dropped)."""
    if not path.is_file():
        raise ConfigError(f"--reference: the published numbers {str(path)!r} are missing from this checkout")
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
    return Reference(data["source"], data["table"], pd.DataFrame(cells), tuple(data.get("notes", [])),
                     tuple(data["zeroshot_tasks"]), int(data["ppl_seqlen"]), pd.DataFrame(cost), tc["table"], tc["device"])


def paper_model(name: str, ref: Reference) -> str | None:
    """The paper's row name for a model given as a zoo name or its hub id; None if not in the paper."""
    by_zoo = dict(zip(ref.cells["zoo"], ref.cells["model"]))
    if name in by_zoo:
        return by_zoo[name]
    for zoo_name, entry in ZOO.items():
        if entry.hub_id and entry.hub_id.lower() == name.lower() and zoo_name in by_zoo:
            return by_zoo[zoo_name]
    return None


def _our_values(record: dict, ref: Reference) -> dict[str, float | None]:
    metrics = record.get("metrics", {})
    ppl = metrics.get("ppl", {})
    return {"wikitext2": ppl.get("wikitext2"), "c4": ppl.get("c4"), "avg": zeroshot_average(metrics, ref.tasks)}


def _protocol_note(record: dict, ref: Reference) -> str | None:
    """Say so when our perplexity was not measured like the paper's (full test set, 2048 tokens)."""
    p = (record.get("evaluation") or {}).get("ppl") or {}
    if not p or not (set(record.get("metrics", {}).get("ppl", {})) & {"wikitext2", "c4"}):
        return None
    if p.get("seqlen") != ref.ppl_seqlen or p.get("max_windows") is not None:
        windows = f", first {p['max_windows']} windows" if p.get("max_windows") else ""
        return f"ours: ppl at {p.get('seqlen')} tokens{windows} (paper: {ref.ppl_seqlen}, all)"
    return None


def _ours(records: list[dict], ref: Reference) -> dict[tuple[str, str, str], dict]:
    """Our runs on the paper's models keyed (paper model, method, bits); the latest run of a key wins."""
    ours: dict[tuple[str, str, str], dict] = {}
    for r in sorted(records, key=lambda r: r.get("finished_at", "")):
        model = paper_model(r["model"], ref)
        if model is None:
            continue
        key = (model, r["method"], r["bits"])
        if key in ours:
            log.warning("%s %s %s: several runs (other options?); showing the latest", *key)
        ours[key] = r
    return ours


def _bits_order(bits: str) -> tuple[int, int]:
    spec = BitSpec.parse(bits)
    return (-spec.w_bits, -spec.a_bits)


def comparison_frame(records: list[dict], ref: Reference | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
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
                                       _bits_order(k[2]), k[1]))
    rows, marks, footnotes = [], [], []
    for model, method, bits in keys:
        record = ours.get((model, method, bits))
        mine = _our_values(record, ref) if record else {}
        row, mark = {"model": model, "method": method, "bits": bits}, {}
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


def quantize_hours(cost: dict) -> float | None:
    """Device-hours of calibration + quantization (the papers' "training cost")."""
    if "quantize_device_hours" in cost:
        return cost["quantize_device_hours"]
    phases = cost.get("phases_s")
    if not phases or "quantize" not in phases:
        return None
    return (phases.get("calibrate", 0.0) + phases["quantize"]) * cost.get("device_count", 1) / 3600.0


def cost_frame(records: list[dict], ref: Reference | None = None) -> pd.DataFrame:
    ref = ref or load_reference()
    ours = _ours(records, ref)
    rows = []
    for c in ref.cost.itertuples():
        record = ours.get((c.model, c.method, c.bits))
        hours = quantize_hours(record.get("cost", {})) if record else None
        rows.append({"model": c.model, "method": c.method, "bits": c.bits, "GPU-h ours": hours, "GPU-h paper": c.gpu_hours,
                     "GPU-h Δ": hours - c.gpu_hours if hours is not None else None,
                     "our device": record.get("cost", {}).get("device") if record else None})
    return pd.DataFrame(rows)


def tables(records: list[dict], ref: Reference | None = None) -> list[Table]:
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
