"""One self-contained HTML page: the report's tables, then its plots as base64 PNG images.

Nothing is fetched when the page is opened (inline CSS, images as ``data:`` URIs), so the file
can be mailed, attached to an issue or opened offline.
"""
from __future__ import annotations

import base64
import datetime as dt
import html

import pandas as pd

from harness.report import plots
from harness.report.frame import aggregate, tidy_frame
from harness.report.tables import Table, to_html
from harness.run.record import RunRecord

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; display: block; overflow-x: auto; }
th, td { padding: 0.3em 0.6em; border-bottom: 1px solid #e4e4e4; white-space: nowrap; }
thead th { border-bottom: 2px solid #444; text-align: left; background: #f6f6f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #f3f7ff; }
.missing { color: #999; } strong { color: #0a4; }
p.note { font-size: 0.85em; color: #555; margin: 0.2em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def figure_html(png: bytes | None, caption: str, absent: str) -> str:
    """An embedded image with its caption, or a sentence saying why there is none (never a broken image)."""
    if not png:
        return f'<h2>{html.escape(caption)}</h2>\n<p class="missing">{html.escape(absent)}</p>\n'
    data = base64.b64encode(png).decode("ascii")
    return (f"<h2>{html.escape(caption)}</h2>\n<figure><img alt=\"{html.escape(caption)}\" "
            f"src=\"data:image/png;base64,{data}\"></figure>\n")


def plots_html(frame: pd.DataFrame) -> str:
    """The figures of a tidy per-run frame, drawn from its aggregate over seeds (error bars: std)."""
    agg = aggregate(frame)
    parts = []
    for make, caption, absent in (
        (plots.ppl_figure, "Perplexity vs bit spec per method (log scale)", "No perplexity results to plot."),
        (plots.zeroshot_figure, "Zero-shot average accuracy per method and bit spec", "No zero-shot results in this directory."),
        (plots.cost_figure, "Cost per method: device-hours and peak memory", "No cost records to plot."),
    ):
        fig = make(agg)
        parts.append(figure_html(plots.to_png(fig) if fig is not None else None, caption, absent))
    return "".join(parts)


def _summary(records: list[RunRecord]) -> str:
    devices = sorted({r.cost["device"] for r in records})
    hours = sum(r.cost["device_hours"] for r in records)
    text = f"{len(records)} runs, {hours:.3g} device-hours in all"
    if devices:
        text += f", on {'; '.join(devices)}"
    return f'<p class="note">{html.escape(text)}. Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by ptqbench.</p>\n'


def page(title: str, tables: list[Table], records: list[RunRecord] | None = None, frame: pd.DataFrame | None = None) -> str:
    """The page; ``records`` add the summary line and the plots (of ``frame``, else ``tidy_frame(records)``)."""
    body = [f"<h1>{html.escape(title)}</h1>\n"]
    if records is not None:
        body.append(_summary(records))
    body += [to_html(t) for t in tables]
    if records:
        body.append(plots_html(frame if frame is not None else tidy_frame(records)))
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n" + "".join(body) + "</body></html>\n")
