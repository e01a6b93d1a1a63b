"""The sweep driver end to end on the tiny random LLaMA: run, resume, failures, a plugin baseline."""
from __future__ import annotations

import json
import math

import pytest

from harness.errors import ConfigError
from harness.run.config import parse_config
from harness.run.execute import plan
from harness.run.results import ResultStore
from harness.run.sweep import run_sweep

TINY = {
    "name": "tiny", "models": ["tiny-random-llama"], "methods": ["rtn", {"name": "clipped-rtn", "clip_ratio": 0.9}],
    "bits": ["W8A8", "W4A4"], "calibration": {"dataset": "brown", "samples": 2, "seqlen": 32},
    "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 32, "max_windows": 2}},
}


@pytest.mark.slow
def test_sweep_records_results_and_resumes(tmp_path):
    config = parse_config(TINY)
    summary = run_sweep(config, tmp_path, progress=False)
    assert len(summary.done) == 5 and not summary.failed
    store = ResultStore(tmp_path)
    records = {(r.method, r.bits): r for r in store.records()}
    fp = records[("fp", "W16A16")]
    assert [r.baseline for r in records.values()].count(True) == 1 and fp.baseline
    for r in records.values():
        assert math.isfinite(r.ppl["brown"]) and r.metrics["ppl_windows"]["brown"] == 2
        assert set(r.cost["phases_s"]) >= {"load", "quantize", "evaluate"}
        assert r.cost["peak_memory_bytes"] > 0 and r.cost["device_hours"] > 0
        prov = r.provenance
        assert prov["packages"]["torch"] and prov["config"]["name"] == "tiny" and "cpu" in prov["hardware"]
        assert "revision" in prov["git"] and r.seed == 0
        assert prov["determinism"]["torch_deterministic_algorithms"] is False  # the default, recorded
    assert records[("rtn", "W8A8")].ppl["brown"] != fp.ppl["brown"]
    assert records[("clipped-rtn", "W8A8")].calibration is None  # no data used, none recorded

    mtimes = {p: p.stat().st_mtime_ns for p in store.runs.glob("*.json")}
    again = run_sweep(config, tmp_path, progress=False)
    assert len(again.skipped) == 5 and not again.done
    assert {p: p.stat().st_mtime_ns for p in store.runs.glob("*.json")} == mtimes

    forced = run_sweep(config, tmp_path, force=True, progress=False)
    assert len(forced.done) == 5


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    good = run_sweep(parse_config(TINY), tmp_path, progress=False)
    before = {p.name: p.read_text() for p in ResultStore(tmp_path).runs.glob("*.json")}
    broken = {**TINY, "models": ["tiny-random-llama", "org-that-does-not-exist/model-x"]}
    summary = run_sweep(parse_config(broken), tmp_path, progress=False)
    assert len(summary.skipped) == len(good.done)  # earlier results are reused, not redone
    assert len(summary.failed) == 5  # every run of the unreachable model
    failure = json.loads(next(ResultStore(tmp_path).failed.glob("*.json")).read_text())
    assert "could not be loaded" in failure["error"]
    assert {p.name: p.read_text() for p in ResultStore(tmp_path).runs.glob("*.json")} == before


def test_invalid_config_runs_nothing(tmp_path):
    with pytest.raises(ConfigError):
        run_sweep(parse_config({**TINY, "bits": ["W4A4", "bad"]}), tmp_path)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_plugin_baseline_replaces_fp_everywhere(tmp_path):
    """tests/plugin_example registers `fp32-reference` (is_baseline) through its entry point."""
    from harness.report.render import report
    from tests.harness.records import grid

    config = parse_config({**TINY, "methods": ["fp32-reference", "rtn", {"name": "clipped-rtn", "clip_ratio": 0.9}],
                           "bits": ["W4A4"]})
    runs = plan(config)
    assert [(r.method, r.bits.name) for r in runs] == [("fp32-reference", "W16A16"), ("rtn", "W4A4"), ("clipped-rtn", "W4A4")]
    assert not run_sweep(config, tmp_path, progress=False).failed
    records = {r.method: r for r in ResultStore(tmp_path).records()}
    assert records["fp32-reference"].baseline and not records["rtn"].baseline and "fp" not in records
    rows = grid(report(tmp_path, "md"), "md", table=1)  # after the ppl_brown pivot table
    assert rows[0]["method"] == "fp32-reference"  # the baseline row comes first
    # its perplexity is the lowest, yet it is the reference, not a competitor: never bold
    assert not rows[0]["ppl_brown"].startswith("**")
    assert sum(r["ppl_brown"].startswith("**") for r in rows[1:]) >= 1
