"""Plots draw the aggregated frame's numbers (checked on the axes' data), one colour per method in every
figure, error bars from the spread over seeds, and None when there is nothing to plot."""
from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.image import imread

from harness.report import plots
from harness.report.frame import aggregate, tidy_frame
from tests.harness.records import record, zeroshot


def frame(with_zeroshot: bool = True):
    zs = (lambda a: zeroshot(a)) if with_zeroshot else (lambda a: None)
    return aggregate(tidy_frame([
        record("m", "fp", "W16A16", ppl={"brown": 40.0}, zeroshot=zs(0.6)),
        record("m", "rtn", "W4A4", ppl={"brown": 900.0}, zeroshot=zs(0.3)),
        record("m", "rtn", "W8A8", ppl={"brown": 41.0}, zeroshot=zs(0.59)),
        record("m", "sq", "W4A4", ppl={"brown": 90.0}, zeroshot=zs(0.4), peak_bytes=None),
    ]))


def seeded():
    """sq at W4A4 over three seeds (80, 90, 100: mean 90, std 10) beside one rtn run."""
    return aggregate(tidy_frame([record("m", "sq", "W4A4", ppl={"brown": p}, seed=s) for s, p in enumerate((80.0, 90.0, 100.0))]
                                + [record("m", "rtn", "W4A4", ppl={"brown": 900.0})]))


def data_lines(ax) -> dict:
    """Label -> y data of the lines drawn with a legend label (error-bar lines carry none)."""
    return {c.get_label(): c.lines[0].get_ydata() for c in ax.containers if hasattr(c, "lines")}


def test_ppl_figure_plots_each_method_over_bits_on_log_scale():
    fig = plots.ppl_figure(frame())
    [ax] = fig.axes
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["W8A8", "W4A4"]  # most bits first; FP is the dashed line
    lines = data_lines(ax)
    np.testing.assert_allclose(lines["rtn"], [41.0, 900.0])
    np.testing.assert_allclose(lines["sq"], [np.nan, 90.0])  # a bit spec a method did not run is a gap, not 0
    assert [ln.get_ydata()[0] for ln in ax.lines if ln.get_label() == "fp (40.00)"] == [40.0]


def test_error_bars_are_the_std_over_seeds():
    ax = plots.ppl_figure(seeded()).axes[0]
    container = next(c for c in ax.containers if c.get_label() == "sq")
    [bar] = container.lines[2]  # the vertical error-bar segments
    segment = bar.get_segments()[0]
    assert segment[:, 1].tolist() == pytest.approx([80.0, 100.0])  # mean 90 -/+ std 10 (ddof 1)


def test_one_colour_per_method_in_every_figure():
    f = frame()
    colours = plots.method_colours(["sq", "rtn"])
    assert colours == {"rtn": "C0", "sq": "C1"}  # sorted names onto tab10, whatever the row order
    ppl = {c.get_label(): to_hex(c.lines[0].get_color()) for c in plots.ppl_figure(f).axes[0].containers}
    zs_ax = plots.zeroshot_figure(f).axes[0]
    bars = {c.get_label(): to_hex(c.patches[0].get_facecolor()) for c in zs_ax.containers if c.get_label() in ("rtn", "sq")}
    hours = plots.cost_figure(f).axes[0]
    cost = [to_hex(p.get_facecolor()) for p in hours.patches]  # rows: fp, rtn W8A8, rtn W4A4, sq W4A4
    want = {m: to_hex(c) for m, c in colours.items()}
    assert ppl == want and bars == want
    assert cost == [to_hex("black"), want["rtn"], want["rtn"], want["sq"]]


def test_zeroshot_and_cost_figures():
    ax = plots.zeroshot_figure(frame()).axes[0]
    heights = [p.get_height() for p in ax.patches]  # per method, per bit spec (W8A8, W4A4)
    np.testing.assert_allclose(heights, [59.0, 30.0, np.nan, 40.0])  # sq has no W8A8 run: a gap
    assert plots.zeroshot_figure(frame(with_zeroshot=False)) is None
    fig = plots.cost_figure(frame())
    hours, memory = fig.axes
    assert [p.get_height() for p in hours.patches] == pytest.approx(list(frame()["device_hours_mean"]))
    assert np.isnan(memory.patches[-1].get_height())  # sq recorded no peak memory: no bar, not a zero bar


def test_png_decodes_and_is_not_blank():
    image = imread(io.BytesIO(plots.to_png(plots.ppl_figure(frame()))), format="png")
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0.01
    empty = aggregate(tidy_frame([]))
    assert plots.ppl_figure(empty) is None and plots.cost_figure(empty) is None and plots.zeroshot_figure(empty) is None
