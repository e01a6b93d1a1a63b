"""End to end on the tiny random LLaMA: plan, run, resume, failures."""
from __future__ import annotations

import json
import math

import pytest

from harness.config import parse_config
from harness.errors import ConfigError
from harness.results import ResultStore
from harness.runner import plan, run_sweep

TINY = {
    "name": "tiny", "models": ["tiny-random-llama"], "methods": ["rtn", {"name": "clipped-rtn", "clip_ratio": 0.9}],
    "bits": ["W8A8", "W4A4"], "calibration": {"dataset": "brown", "samples": 2, "seqlen": 32},
    "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 32, "max_windows": 2}},
}


def test_plan_always_has_the_baseline_once_per_model():
    runs = plan(parse_config({**TINY, "methods": ["rtn", "fp", "rtn"]}))
    labels = [r.label for r in runs]
    assert labels == ["tiny-random-llama fp W16A16", "tiny-random-llama rtn W8A8", "tiny-random-llama rtn W4A4"]
    assert len({r.key for r in runs}) == len(runs)


def test_key_depends_on_what_decides_the_result():
    base = plan(parse_config(TINY))[1]
    other_seed = plan(parse_config({**TINY, "seed": 1}))[1]
    other_eval = plan(parse_config({**TINY, "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 32, "max_windows": 3}}}))[1]
    other_calib = plan(parse_config({**TINY, "calibration": {"dataset": "brown", "samples": 3, "seqlen": 32}}))[1]
    assert len({base.key, other_seed.key, other_eval.key}) == 3
    assert other_calib.key == base.key  # RTN uses no calibration data, so its result does not depend on it
    explicit = plan(parse_config({**TINY, "methods": [{"name": "clipped-rtn", "clip_ratio": 0.9}]}))[1]
    default = plan(parse_config({**TINY, "methods": ["clipped-rtn"]}))[1]
    assert explicit.key == default.key  # defaults are made explicit before hashing


def test_sweep_records_results_and_resumes(tmp_path):
    config = parse_config(TINY)
    summary = run_sweep(config, tmp_path, progress=False)
    assert len(summary.done) == 5 and not summary.failed
    store = ResultStore(tmp_path)
    records = {(r["method"], r["bits"]): r for r in store.records()}
    fp = records[("fp", "W16A16")]
    for r in records.values():
        assert math.isfinite(r["metrics"]["ppl"]["brown"]) and r["metrics"]["ppl_windows"]["brown"] == 2
        assert set(r["cost"]["phases_s"]) >= {"load", "quantize", "evaluate"}
        assert r["cost"]["peak_memory_bytes"] > 0 and r["cost"]["device_hours"] > 0
        prov = r["provenance"]
        assert prov["packages"]["torch"] and prov["config"]["name"] == "tiny" and "cpu" in prov["hardware"]
        assert "revision" in prov["git"] and r["seed"] == 0
    assert records[("rtn", "W8A8")]["metrics"]["ppl"]["brown"] != fp["metrics"]["ppl"]["brown"]
    assert records[("clipped-rtn", "W8A8")]["calibration"] is None  # no data used, none recorded

    mtimes = {p: p.stat().st_mtime_ns for p in store.runs.glob("*.json")}
    again = run_sweep(config, tmp_path, progress=False)
    assert len(again.skipped) == 5 and not again.done
    assert {p: p.stat().st_mtime_ns for p in store.runs.glob("*.json")} == mtimes

    forced = run_sweep(config, tmp_path, force=True, progress=False)
    assert len(forced.done) == 5


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
