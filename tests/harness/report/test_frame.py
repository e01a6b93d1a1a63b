"""harness.report.frame: the zero-shot average, the tidy frame's rows and columns, variant labels, aggregation over seeds."""
from __future__ import annotations

import math
import re

import pytest

from harness.registry import get_method
from harness.report.frame import aggregate, tidy_frame, variant_label, zeroshot_average
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
    frame = tidy_frame(records)
    assert list(zip(frame["method"], frame["bits"])) == [
        ("ref16", "W16A16"), ("awq", "W4A4"),
        ("rtn", "W8A8"), ("rtn", "W4A16"), ("rtn", "W4A8"), ("rtn", "W4A4"), ("rtn", "W4A4g128")]
    assert frame["baseline"].tolist() == [True] + [False] * 6


def test_variant_is_the_options_that_differ_from_the_defaults():
    assert variant_label("qllm", {}) == ""
    assert variant_label("qllm", get_method("qllm").config_class().to_dict()) == ""  # defaults made explicit
    assert variant_label("qllm", {"theta": "ratio", "assembly": False, "epochs": 10}) == "assembly=false, theta=ratio"
    assert variant_label("smoothquant", {"alpha": 0.85}) == "alpha=0.85"
    assert variant_label("not-installed", {"b": None, "a": 1}) == "a=1, b=null"  # unknown defaults: every option


def test_ablation_variants_are_separate_rows():
    options = [{"theta": "ratio", "assembly": False}, {"theta": "ratio"}, {}]
    frame = tidy_frame([record("m", "qllm", "W4A4", ppl={"brown": 10.0 + i}, options=o) for i, o in enumerate(options)])
    assert frame["variant"].tolist() == ["", "assembly=false, theta=ratio", "theta=ratio"]
    assert len(aggregate(frame)) == 3


def test_aggregate_mean_std_and_n_by_hand():
    values = {0: 12.0, 1: 13.0, 2: 17.0}
    records = [record("m", "sq", "W4A4", ppl={"brown": v}, seed=s) for s, v in values.items()]
    records.append(record("m", "rtn", "W4A4", ppl={"brown": 30.0}))
    agg = aggregate(tidy_frame(records)).set_index("method")
    mean = (12 + 13 + 17) / 3  # 14
    std = math.sqrt(((12 - mean) ** 2 + (13 - mean) ** 2 + (17 - mean) ** 2) / (3 - 1))  # sample std: sqrt(7)
    assert agg.loc["sq", "ppl_brown_mean"] == pytest.approx(mean) and agg.loc["sq", "ppl_brown_std"] == pytest.approx(std)
    assert agg.loc["sq", "n"] == 3 and agg.loc["sq", "seeds"] == "0,1,2"
    assert agg.loc["rtn", "n"] == 1 and math.isnan(agg.loc["rtn", "ppl_brown_std"])  # one run: no spread, not 0
    assert agg.loc["sq", "wall_s_std"] == 0.0  # identical costs: a real spread of zero


def test_tidy_columns_are_snake_case_with_units():
    zs = {"tasks": {"arc_easy": {"acc": 0.5, "metric": "acc"}, "hellaswag": {"acc": 0.2, "acc_norm": 0.3, "metric": "acc_norm"}}}
    frame = tidy_frame([record("m", "rtn", "W4A4", ppl={"brown": 20.0, "/data/my-text.txt": 30.0}, zeroshot=zs)])
    assert list(frame.columns) == [
        "run_key", "model", "method", "variant", "bits", "seed", "baseline", "seed_independent", "ppl_brown", "ppl_data_my_text_txt",
        "arc_easy_acc_pct", "hellaswag_acc_norm_pct", "zeroshot_avg_pct", "wall_s", "load_s", "calibrate_s", "quantize_s",
        "evaluate_s", "device_hours", "quantize_device_hours", "peak_memory_gib", "device"]
    assert all(re.fullmatch(r"[a-z0-9_]+", c) for c in frame.columns)
    assert frame.iloc[0]["hellaswag_acc_norm_pct"] == pytest.approx(30.0) and frame.iloc[0]["zeroshot_avg_pct"] == pytest.approx(40.0)
