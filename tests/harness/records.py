"""Hand-written result records (``harness.run.record.RunRecord``, as ``harness.run.execute.execute`` makes), for report tests."""
from __future__ import annotations

from harness.bits import BitSpec
from harness.run.record import RunRecord
from harness.run.results import ResultStore, run_key

PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")


def record(model: str, method: str, bits: str, *, ppl: dict | None = None, zeroshot: dict | None = None,
           phases: dict | None = None, peak_bytes: int | None = 2**30, device: str = "CPU test (2 threads)",
           seqlen: int = 2048, max_windows: int | None = None, finished_at: str = "2026-01-01T00:00:00+00:00",
           baseline: bool | None = None, seed: int = 0, options: dict | None = None) -> RunRecord:
    """A record; ``baseline`` defaults to whether the method is the built-in baseline ``fp``."""
    phases = {"load": 1.0, "quantize": 2.0, "evaluate": 3.0} if phases is None else phases
    wall = sum(phases.values())
    metrics: dict = {"ppl": dict(ppl or {})}
    if zeroshot is not None:
        metrics["zeroshot"] = dict(zeroshot)
    identity = {"model": model, "method": method, "bits": bits, "seqlen": seqlen}
    if seed or options:  # records made before seeds and options existed here keep their keys
        identity.update(seed=seed, options=options or {})
    quantize_s = phases.get("calibrate", 0.0) + phases.get("quantize", 0.0)
    cost = {"wall_s": wall, "phases_s": phases, "device": device, "device_type": "cpu", "device_count": 1,
            "device_hours": wall / 3600.0, "quantize_device_hours": quantize_s / 3600.0,
            "peak_memory_kind": "cpu_peak_rss", "peak_memory_bytes": peak_bytes}
    return RunRecord(
        key=run_key(identity), model=model, model_source="test", method=method,
        baseline=method == "fp" if baseline is None else baseline,
        options=dict(options or {}), bits=bits, bit_spec=BitSpec.parse(bits).to_dict(), calibration=None,
        evaluation={"ppl": {"datasets": sorted(ppl or {}), "seqlen": seqlen, "max_windows": max_windows, "batch_size": 1}},
        seed=seed, metrics=metrics, cost=cost, started_at=finished_at, finished_at=finished_at,
    )


def zeroshot(acc: float, tasks: tuple[str, ...] = PAPER_TASKS) -> dict:
    """``metrics["zeroshot"]`` as harness.evaluation.zeroshot writes it, every task at ``acc`` (its compared metric)."""
    return {"tasks": {t: {"acc": acc, "metric": "acc"} for t in tasks}, "average": acc}


def store(tmp_path, records: list[dict]):
    s = ResultStore(tmp_path / "results")
    for r in records:
        s.write(r.key, r)
    return s.root


def grid(text: str, fmt: str, table: int = 0) -> list[dict[str, str]]:
    """Read back the ``table``-th table of a rendered report as rows of {column: cell text}.

    Bold stays visible as ``**x**`` (Markdown), ``\\textbf{x}`` (LaTeX) and ``<strong>x</strong>``
    (HTML, normalised to ``**x**``) so tests can check which cells are bold.
    """
    if fmt == "csv":
        import csv
        import io

        return list(csv.DictReader(io.StringIO(text)))
    if fmt == "md":
        blocks, current = [], []
        for line in text.splitlines() + [""]:
            if line.startswith("|"):
                current.append(line)
            elif current:
                blocks.append(current)
                current = []
        lines = blocks[table]
        split = lambda ln: [c.strip() for c in ln.strip().strip("|").split(" | ")]  # noqa: E731
        header = split(lines[0])
        return [dict(zip(header, split(ln))) for ln in lines[2:]]
    if fmt == "tex":
        body = text.split(r"\begin{tabular}")[table + 1].split(r"\bottomrule")[0]
        lines = [ln for ln in body.splitlines() if ln.endswith(r"\\")]
        split = lambda ln: [c.strip() for c in ln[: -2].split(" & ")]  # noqa: E731
        header = [h.replace(r"$\Delta$", "Δ").replace(r"\_", "_") for h in split(lines[0])]
        return [dict(zip(header, split(ln))) for ln in lines[1:]]
    if fmt == "html":
        from html.parser import HTMLParser

        class Cells(HTMLParser):
            def __init__(self) -> None:
                super().__init__()
                self.tables: list[list[list[str]]] = []
                self.cell: str | None = None

            def handle_starttag(self, tag, attrs):
                if tag == "table":
                    self.tables.append([])
                elif tag == "tr":
                    self.tables[-1].append([])
                elif tag in ("td", "th"):
                    self.cell = ""
                elif tag == "strong" and self.cell is not None:
                    self.cell += "**"

            def handle_endtag(self, tag):
                if tag in ("td", "th"):
                    self.tables[-1][-1].append(self.cell)
                    self.cell = None
                elif tag == "strong" and self.cell is not None:
                    self.cell += "**"

            def handle_data(self, data):
                if self.cell is not None:
                    self.cell += data

        parser = Cells()
        parser.feed(text)
        rows = parser.tables[table]
        return [dict(zip(rows[0], r)) for r in rows[1:]]
    raise ValueError(fmt)


def bold(cell: str, fmt: str) -> str | None:
    """The text inside the bold markup of ``cell`` in ``fmt``, or None when not bold."""
    if fmt == "tex":
        return cell[len(r"\textbf{"):].split("}")[0] if cell.startswith(r"\textbf{") else None
    return cell[2:].split("**")[0] if cell.startswith("**") else None
