"""harness.execute: a sweep's plan and each run's key (what decides a result)."""
from __future__ import annotations

from harness.config import parse_config
from harness.execute import plan
from tests.harness.test_sweep import TINY


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
