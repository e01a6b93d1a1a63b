"""harness.frame: the zero-shot average and the results frame's row order."""
from __future__ import annotations

import pytest

from harness.frame import results_frame, zeroshot_average
from tests.harness.records import PAPER_TASKS, record


def zs(**scores: tuple[float, float, str]) -> dict:
    """tasks given as name=(acc, acc_norm, compared metric)."""
    return {"tasks": {t: {"acc": a, "acc_norm": n, "metric": m} for t, (a, n, m) in scores.items()}}


def test_zeroshot_average_is_percent_of_each_tasks_compared_metric_and_needs_every_task():
    r = record("m", "rtn", "W4A4", zeroshot=zs(piqa=(0.8, 0.1, "acc"), hellaswag=(0.2, 0.6, "acc_norm")))
    assert zeroshot_average(r) == pytest.approx(70.0)  # (0.8 + 0.6) / 2, in percent
    assert zeroshot_average(r, ["piqa"]) == pytest.approx(80.0)
    assert zeroshot_average(r, PAPER_TASKS) is None  # a partial average is never shown as the five-task one
    assert zeroshot_average(record("m", "rtn", "W4A4")) is None


def test_rows_baseline_first_then_methods_then_most_bits_first():
    records = [record("m", "rtn", b) for b in ("W4A4", "W4A16", "W4A4g128", "W8A8", "W4A8")]
    records += [record("m", "awq", "W4A4"), record("m", "ref16", "W16A16", baseline=True)]
    frame = results_frame(records)
    assert list(zip(frame["method"], frame["bits"])) == [
        ("ref16", "W16A16"), ("awq", "W4A4"),
        ("rtn", "W8A8"), ("rtn", "W4A16"), ("rtn", "W4A8"), ("rtn", "W4A4"), ("rtn", "W4A4g128")]
    assert frame["baseline"].tolist() == [True] + [False] * 6
