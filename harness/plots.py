"""Matplotlib figures of a results frame, returned as PNG bytes for the HTML report.

- ``ppl_figure``: perplexity vs bit spec, one line per method, log y; the FP baseline dashed.
- ``zeroshot_figure``: zero-shot average accuracy per method and bit spec (grouped bars).
- ``cost_figure``: device-hours and peak memory per method (bars per bit spec).
One row of panels per model. Each returns ``None`` when the frame has nothing to plot, so the
page says so instead of showing an empty image. Uses ``matplotlib.figure.Figure`` directly (no
pyplot): no global figure state and no GUI backend.
"""
from __future__ import annotations

import io
import math

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from harness.bits import bits_order
from harness.frame import BASELINE

PANEL = (5.2, 3.4)  # inches per panel


def _competitors(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[~frame[BASELINE].astype(bool)]


def _bits_order(frame: pd.DataFrame) -> list[str]:
    return bits_order(set(_competitors(frame)["bits"]))


def _methods(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(_competitors(frame)["method"]))


def _baseline(frame: pd.DataFrame, column: str) -> tuple[str, float] | None:
    """(method name, value) of the reference run, for the dashed line."""
    rows = frame[frame[BASELINE].astype(bool)].dropna(subset=[column])
    return (rows["method"].iloc[0], float(rows[column].iloc[0])) if len(rows) else None


def _figure(rows: int, cols: int, widen: float = 1.0) -> tuple[Figure, list[list]]:
    fig = Figure(figsize=(PANEL[0] * cols * widen, PANEL[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def to_png(fig: Figure, dpi: int = 96) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _valid(values: pd.Series) -> bool:
    return any(isinstance(v, (int, float)) and not math.isnan(v) for v in values)


def ppl_figure(frame: pd.DataFrame) -> Figure | None:
    columns = [c for c in frame.columns if c.startswith("ppl ") and _valid(frame[c])]
    if frame.empty or not columns:
        return None
    models = list(dict.fromkeys(frame["model"]))
    fig, axes = _figure(len(models), len(columns))
    for i, model in enumerate(models):
        sub = frame[frame["model"] == model]
        bits = _bits_order(sub)
        for j, column in enumerate(columns):
            ax = axes[i][j]
            for method in _methods(sub):
                rows = sub[sub["method"] == method].set_index("bits")[column].reindex(bits)
                ax.plot(range(len(bits)), rows.to_numpy(dtype=float), marker="o", label=method)
            if ref := _baseline(sub, column):
                ax.axhline(ref[1], color="black", linestyle="--", linewidth=1, label=f"{ref[0]} ({ref[1]:.2f})")
            ax.set_yscale("log")
            # plain numbers (42.8), not 4.28x10^1; minor ticks labelled when the range is narrow
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
            ax.set_xticks(range(len(bits)), bits)
            ax.set_xlim(-0.3, max(len(bits) - 0.7, 0.3))
            ax.set_xlabel("bit spec (fewer bits to the right)")
            ax.set_ylabel(f"{column} (log)")
            ax.set_title(f"{model}: {column}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
    return fig


def _grouped_bars(ax, sub: pd.DataFrame, column: str, groups: list[str], group_col: str, series: list[str], series_col: str) -> None:
    width = 0.8 / max(len(series), 1)
    for k, name in enumerate(series):
        part = sub[sub[series_col] == name].set_index(group_col)[column].reindex(groups).to_numpy(dtype=float)
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, part, width=width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(True, axis="y", alpha=0.3)


def zeroshot_figure(frame: pd.DataFrame, column: str = "zero-shot avg") -> Figure | None:
    if frame.empty or column not in frame.columns or not _valid(frame[column]):
        return None
    models = list(dict.fromkeys(frame["model"]))
    fig, axes = _figure(len(models), 1, widen=1.4)  # room for the legend
    for i, model in enumerate(models):
        sub, ax = frame[frame["model"] == model], axes[i][0]
        _grouped_bars(ax, sub, column, _bits_order(sub), "bits", _methods(sub), "method")
        if ref := _baseline(sub, column):
            ax.axhline(ref[1], color="black", linestyle="--", linewidth=1, label=f"{ref[0]} ({ref[1]:.2f})")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{model}: {column}")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    return fig


COST_COLUMNS = {"device-h": "device-hours", "peak mem GiB": "peak memory (GiB)"}


def cost_figure(frame: pd.DataFrame) -> Figure | None:
    """One bar per run (the FP baseline included), coloured by method, bit specs in row order."""
    columns = [c for c in COST_COLUMNS if c in frame.columns and _valid(frame[c])]
    if frame.empty or not columns:
        return None
    models = list(dict.fromkeys(frame["model"]))
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(frame["method"]))}
    fig, axes = _figure(len(models), len(columns))
    for i, model in enumerate(models):
        sub = frame[frame["model"] == model]
        labels = [m if base else f"{m} {b}" for m, b, base in zip(sub["method"], sub["bits"], sub[BASELINE])]
        for j, column in enumerate(columns):
            ax = axes[i][j]
            ax.bar(range(len(sub)), sub[column].to_numpy(dtype=float), color=[colours[m] for m in sub["method"]])
            ax.set_xticks(range(len(sub)), labels, fontsize="small", rotation=45, ha="right", rotation_mode="anchor")
            ax.set_ylabel(COST_COLUMNS[column])
            ax.set_title(f"{model}: {COST_COLUMNS[column]}")
            ax.grid(True, axis="y", alpha=0.3)
    return fig
