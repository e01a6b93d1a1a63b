"""Plots draw the frame's numbers (checked on the axes' data) and say None when there is nothing to plot."""
from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.image import imread

from harness import plots
from harness.frame import ZS_AVG, results_frame
from tests.harness.records import record, zeroshot


def frame(with_zeroshot: bool = True):
    zs = (lambda a: zeroshot(a)) if with_zeroshot else (lambda a: None)
    return results_frame([
        record("m", "fp", "W16A16", ppl={"brown": 40.0}, zeroshot=zs(0.6)),
        record("m", "rtn", "W4A4", ppl={"brown": 900.0}, zeroshot=zs(0.3)),
        record("m", "rtn", "W8A8", ppl={"brown": 41.0}, zeroshot=zs(0.59)),
        record("m", "sq", "W4A4", ppl={"brown": 90.0}, zeroshot=zs(0.4), peak_bytes=None),
    ])


def test_ppl_figure_plots_each_method_over_bits_on_log_scale():
    fig = plots.ppl_figure(frame())
    [ax] = fig.axes
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["W8A8", "W4A4"]  # most bits first; FP is the dashed line
    lines = {ln.get_label(): ln.get_ydata() for ln in ax.lines}
    np.testing.assert_allclose(lines["rtn"], [41.0, 900.0])
    np.testing.assert_allclose(lines["sq"], [np.nan, 90.0])  # a bit spec a method did not run is a gap, not 0
    assert lines["fp (40.00)"][0] == 40.0


def test_zeroshot_and_cost_figures():
    ax = plots.zeroshot_figure(frame()).axes[0]
    heights = [p.get_height() for p in ax.patches]  # per method, per bit spec (W8A8, W4A4)
    np.testing.assert_allclose(heights, [59.0, 30.0, np.nan, 40.0])  # sq has no W8A8 run: a gap
    assert plots.zeroshot_figure(frame(with_zeroshot=False)) is None
    fig = plots.cost_figure(frame())
    hours, memory = fig.axes
    assert [p.get_height() for p in hours.patches] == pytest.approx(list(frame()["device-h"]))
    assert np.isnan(memory.patches[-1].get_height())  # sq recorded no peak memory: no bar, not a zero bar


def test_png_decodes_and_is_not_blank():
    image = imread(io.BytesIO(plots.to_png(plots.ppl_figure(frame()))), format="png")
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0.01
    empty = results_frame([])
    assert plots.ppl_figure(empty) is None and plots.cost_figure(empty) is None and ZS_AVG not in empty.columns
