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


def test_overrides_reach_only_the_matching_runs():
    config = {**TINY, "models": ["tiny-random-llama", "smollm2-135m"], "methods": ["clipped-rtn"],
              "overrides": [{"models": ["smollm2-135m"], "bits": ["W4A4"], "methods": {"clipped-rtn": {"clip_ratio": 0.5}}},
                            {"bits": ["W4A4"], "methods": {"clipped-rtn": {"clip_ratio": 0.7}}}]}
    runs = {(r.model, r.bits.name): r for r in plan(parse_config(config)) if r.method == "clipped-rtn"}
    ratios = {k: r.config.clip_ratio for k, r in runs.items()}
    default = parse_config({**TINY, "methods": ["clipped-rtn"]}).methods[0].config.clip_ratio
    # later overrides win; runs no override matches keep the entry's options (and their keys)
    assert ratios == {("tiny-random-llama", "W8A8"): default, ("tiny-random-llama", "W4A4"): 0.7,
                      ("smollm2-135m", "W8A8"): default, ("smollm2-135m", "W4A4"): 0.7}
    first_only = {**config, "overrides": config["overrides"][:1]}
    runs1 = {(r.model, r.bits.name): r for r in plan(parse_config(first_only)) if r.method == "clipped-rtn"}
    assert runs1[("smollm2-135m", "W4A4")].config.clip_ratio == 0.5
    assert runs1[("smollm2-135m", "W4A4")].identity()["options"]["clip_ratio"] == 0.5
    assert runs1[("smollm2-135m", "W8A8")].key == runs[("smollm2-135m", "W8A8")].key


def test_attention_setting_is_part_of_the_key_and_off_keeps_old_keys():
    auto, off = plan(parse_config(TINY)), plan(parse_config({**TINY, "quant": {"attention": False}}))
    by_bits = lambda runs: {r.bits.name: r for r in runs}  # noqa: E731
    a, o = by_bits(auto), by_bits(off)
    assert a["W4A4"].bits.attention and not o["W4A4"].bits.attention
    assert a["W4A4"].key != o["W4A4"].key
    assert "attention" not in o["W4A4"].identity()["bits"]  # off: the identity of runs from before the setting
    assert a["W16A16"].key == o["W16A16"].key  # the FP baseline is the same run either way
