"""Matplotlib figures of aggregated results (``harness.report.frame.aggregate``), as PNG bytes for the HTML report.

- ``ppl_figure``: perplexity vs bit spec, one line per method (and variant), log y; the FP baseline dashed.
- ``zeroshot_figure``: zero-shot average accuracy per method and bit spec (grouped bars).
- ``cost_figure``: device-hours and peak memory per method (bars per bit spec).
Every value is a mean over seeds with the std as an error bar (none for a single run). One row
of panels per model. One colour per method in every figure (``method_colours``: methods by name
onto the tab10 cycle, the baseline black); a method's variants share its colour and differ in
line style or hatching. Each returns ``None`` when the frame has nothing to plot, so the page says
so instead of showing an empty image. Uses ``matplotlib.figure.Figure`` directly (no pyplot): no
global figure state and no GUI backend.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from harness.bits import bits_order
from harness.report.frame import BASELINE, ZS_AVG

PANEL = (5.2, 3.4)  # inches per panel


LINESTYLES = ("-", "--", ":", "-.")
HATCHES = ("", "//", "..", "xx")
BASELINE_COLOUR = "black"


def method_colours(methods) -> dict[str, str]:
    """A colour per quantized method: sorted names onto tab10 (``C0`` ...); every figure of a report uses
    this one map, with the competitors of the whole frame (the baseline is always black)."""
    return {m: f"C{i % 10}" for i, m in enumerate(sorted(set(methods)))}


def _competitors(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[~frame[BASELINE].astype(bool)]


def _bits_order(frame: pd.DataFrame) -> list[str]:
    return bits_order(set(_competitors(frame)["bits"]))


def _series(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(method, variant) pairs of the competitors, in row order."""
    comp = _competitors(frame)
    return list(dict.fromkeys(zip(comp["method"], comp["variant"])))


def _label(method: str, variant: str) -> str:
    return f"{method} ({variant})" if variant else method


def _style(frame: pd.DataFrame, method: str, variant: str, styles: tuple[str, ...]) -> str:
    """The variant's style: its position among the method's variants (defaults first, as the frame sorts)."""
    variants = list(dict.fromkeys(_competitors(frame).query("method == @method")["variant"]))
    return styles[variants.index(variant) % len(styles)]


def _values(frame: pd.DataFrame, column: str, index: str, order: list) -> tuple[np.ndarray, np.ndarray]:
    """Means and stds of ``column`` indexed by ``index`` in ``order`` (NaN where absent; std 0 where one run)."""
    rows = frame.set_index(index).reindex(order)
    mean = rows[f"{column}_mean"].to_numpy(dtype=float)
    return mean, np.nan_to_num(rows[f"{column}_std"].to_numpy(dtype=float))


def _baseline(frame: pd.DataFrame, column: str) -> tuple[str, float] | None:
    """(method name, mean) of the reference run, for the dashed line."""
    rows = frame[frame[BASELINE].astype(bool)].dropna(subset=[f"{column}_mean"])
    return (rows["method"].iloc[0], float(rows[f"{column}_mean"].iloc[0])) if len(rows) else None


def _metrics(frame: pd.DataFrame, prefix: str) -> list[str]:
    return [c.removesuffix("_mean") for c in frame.columns if c.startswith(prefix) and c.endswith("_mean") and _valid(frame[c])]


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
    columns = _metrics(frame, "ppl_")
    if frame.empty or not columns:
        return None
    models = list(dict.fromkeys(frame["model"]))
    colours = method_colours(_competitors(frame)["method"])
    fig, axes = _figure(len(models), len(columns))
    for i, model in enumerate(models):
        sub = frame[frame["model"] == model]
        bits = _bits_order(sub)
        for j, column in enumerate(columns):
            ax = axes[i][j]
            series = _series(sub)
            for k, (method, variant) in enumerate(series):
                rows = sub[(sub["method"] == method) & (sub["variant"] == variant)]
                mean, std = _values(rows, column, "bits", bits)
                shift = (k - (len(series) - 1) / 2) * min(0.06, 0.3 / len(series))  # error bars side by side, not on top
                ax.errorbar([x + shift for x in range(len(bits))], mean, yerr=std, marker="o", capsize=3, color=colours[method],
                            linestyle=_style(sub, method, variant, LINESTYLES), label=_label(method, variant))
            if ref := _baseline(sub, column):
                ax.axhline(ref[1], color=BASELINE_COLOUR, linestyle="--", linewidth=1, label=f"{ref[0]} ({ref[1]:.2f})")
            ax.set_yscale("log")
            # plain numbers (42.8), not 4.28x10^1; minor ticks labelled when the range is narrow
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
            ax.set_xticks(range(len(bits)), bits)
            ax.set_xlim(-0.3, max(len(bits) - 0.7, 0.3))
            ax.set_xlabel("bit spec (fewer bits to the right)")
            ax.set_ylabel(f"{column} (log)")
            ax.set_title(f"{model}: {column} (mean ± std over seeds)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
    return fig


def zeroshot_figure(frame: pd.DataFrame, column: str = ZS_AVG) -> Figure | None:
    if frame.empty or f"{column}_mean" not in frame.columns or not _valid(frame[f"{column}_mean"]):
        return None
    models = list(dict.fromkeys(frame["model"]))
    colours = method_colours(_competitors(frame)["method"])
    fig, axes = _figure(len(models), 1, widen=1.4)  # room for the legend
    for i, model in enumerate(models):
        sub, ax = frame[frame["model"] == model], axes[i][0]
        bits, series = _bits_order(sub), _series(sub)
        width = 0.8 / max(len(series), 1)
        for k, (method, variant) in enumerate(series):
            rows = sub[(sub["method"] == method) & (sub["variant"] == variant)]
            mean, std = _values(rows, column, "bits", bits)
            xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(bits))]
            ax.bar(xs, mean, width=width, yerr=std, capsize=3, color=colours[method],
                   hatch=_style(sub, method, variant, HATCHES), label=_label(method, variant))
        ax.set_xticks(range(len(bits)), bits)
        ax.grid(True, axis="y", alpha=0.3)
        if ref := _baseline(sub, column):
            ax.axhline(ref[1], color=BASELINE_COLOUR, linestyle="--", linewidth=1, label=f"{ref[0]} ({ref[1]:.2f})")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{model}: {column} (mean ± std over seeds)")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    return fig


COST_COLUMNS = {"device_hours": "device-hours", "peak_memory_gib": "peak memory (GiB)"}


def cost_figure(frame: pd.DataFrame) -> Figure | None:
    """One bar per row (the FP baseline included), coloured by method, bit specs in row order."""
    columns = [c for c in COST_COLUMNS if f"{c}_mean" in frame.columns and _valid(frame[f"{c}_mean"])]
    if frame.empty or not columns:
        return None
    models = list(dict.fromkeys(frame["model"]))
    colours = method_colours(_competitors(frame)["method"])
    fig, axes = _figure(len(models), len(columns))
    for i, model in enumerate(models):
        sub = frame[frame["model"] == model]
        labels = [m if base else " ".join(x for x in (m, v, b) if x)
                  for m, v, b, base in zip(sub["method"], sub["variant"], sub["bits"], sub[BASELINE])]
        bar_colours = [BASELINE_COLOUR if base else colours[m] for m, base in zip(sub["method"], sub[BASELINE])]
        for j, column in enumerate(columns):
            ax = axes[i][j]
            ax.bar(range(len(sub)), sub[f"{column}_mean"].to_numpy(dtype=float), color=bar_colours, capsize=3,
                   yerr=np.nan_to_num(sub[f"{column}_std"].to_numpy(dtype=float)))
            ax.set_xticks(range(len(sub)), labels, fontsize="small", rotation=45, ha="right", rotation_mode="anchor")
            ax.set_ylabel(COST_COLUMNS[column])
            ax.set_title(f"{model}: {COST_COLUMNS[column]}")
            ax.grid(True, axis="y", alpha=0.3)
    return fig
