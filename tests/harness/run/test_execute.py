"""harness.run.execute: a sweep's plan and each run's key (what decides a result)."""
from __future__ import annotations

import json

import pytest
import torch

from harness.run.config import parse_config
from harness.run.execute import execute, plan
from tests.harness.run.test_sweep import TINY


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


def test_attention_kernel_is_part_of_the_key_and_sdpa_keeps_old_keys():
    default, sdpa, eager = (plan(parse_config({**TINY, **extra})) for extra in ({}, {"attention_kernel": "sdpa"}, {"attention_kernel": "eager"}))
    assert [r.key for r in sdpa] == [r.key for r in default] and all("attention_kernel" not in r.identity() for r in sdpa)
    assert all(r.attention_kernel == "eager" and r.identity()["attention_kernel"] == "eager" for r in eager)
    assert not {r.key for r in eager} & {r.key for r in default}  # FP included: the kernel changes its numbers too


def test_attention_kernel_reaches_the_model_and_agrees_with_sdpa_in_fp():
    """The loaded model computes with the kernel asked for; in FP both kernels give the same logits to rounding."""
    from harness.models import load_model

    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kernel in ("sdpa", "eager"):
        model = load_model("tiny-random-llama", dtype="float32", device="cpu", attention_kernel=kernel).model
        assert model.config._attn_implementation == kernel
        with torch.no_grad():
            logits[kernel] = model(ids).logits
    assert not torch.equal(logits["sdpa"], logits["eager"])  # two kernels, not one under two names
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-4)


def test_seeds_multiply_the_plan_and_one_seed_keeps_todays_keys():
    seeded = {**TINY, "methods": ["smoothquant", "clipped-rtn"]}  # calibration data, or a plugin that may use the seed
    one = plan(parse_config(seeded))
    assert plan(parse_config({**seeded, "seeds": [0]})) == one  # seeds: [0] is the sweep seed: 0 always was
    three = plan(parse_config({**seeded, "seeds": [0, 1, 2]}))
    fp = [r for r in three if r.method == "fp"]
    others = [r for r in three if r.method != "fp"]
    assert len(others) == 3 * (len(one) - 1) and [r.seed for r in others] == [s for s in (0, 1, 2) for _ in one[1:]]
    assert [r.key for r in three[: len(one)]] == [r.key for r in one]
    assert len({r.key for r in three}) == len(three)  # the seed is part of every key
    assert [r.seed for r in fp] == [0]  # the FP baseline: no data, no randomness


def test_a_method_the_seed_cannot_change_runs_once_per_seed_sweep():
    from harness.registry import get_method

    assert get_method("rtn").seed_independent() and get_method("fp").seed_independent()
    assert not get_method("smoothquant").seed_independent()  # its calibration windows are drawn with the seed
    assert not get_method("clipped-rtn").seed_independent()  # a plugin that does not say so keeps a run per seed
    three = plan(parse_config({**TINY, "methods": ["rtn", "smoothquant"], "bits": ["W4A4"], "seeds": [3, 1, 2]}))
    assert [(r.method, r.seed) for r in three] == [("fp", 3), ("rtn", 3), ("smoothquant", 3), ("smoothquant", 1),
                                                   ("smoothquant", 2)]
    one = plan(parse_config({**TINY, "methods": ["rtn"], "bits": ["W4A4"], "seed": 3}))
    assert [r.key for r in three[:2]] == [r.key for r in one]  # the one-seed sweep's keys


# The options of runs keyed before let_init, shuffle, zero_point_grad, search_order and noop_candidate
# existed: every field of the two configs at its default then, as their to_dict() wrote it.
KEYED_BEFORE = {
    "omniquant": {"epochs": 20, "lwc": True, "let": True, "lwc_lr": 0.01, "let_lr": 0.005, "alpha": 0.5, "batch_size": 1,
                  "lwc_init": 4.0, "max_samples": None, "aug_loss": False, "let_attention": "exact"},
    "qllm": {"disassembly": True, "assembly": True, "theta": "adaptive", "theta_value": None, "channel_ratio": 0.2,
             "grid_steps": 0, "search_samples": 1, "error_correction": True, "rank": 4, "alpha": 1.0, "blocks_per_job": 4,
             "epochs": 10, "lr": 0.0005, "batch_size": 1, "train_norms": True, "final_norm": "weight_bias"},
}
OFFICIAL_SWITCHES = {
    "omniquant": {"let_init": ("pair", "official"), "shuffle": (True, False), "zero_point_grad": ("ste", "none")},
    "qllm": {"search_order": ("applied", "official"), "noop_candidate": (True, False), "shuffle": (True, False),
             "zero_point_grad": ("ste", "none")},
}


@pytest.mark.parametrize("method", KEYED_BEFORE)
def test_official_switches_at_their_defaults_keep_old_keys_and_labels(method):
    """A default config (and one that spells the new options out at their defaults) hashes exactly the old
    options, so its run key and report label are those of runs made before the options existed."""
    from harness.report.frame import variant_label
    from harness.run.results import run_key

    def run(options):
        return next(r for r in plan(parse_config({**TINY, "methods": [{"name": method, **options}]})) if r.method == method)

    default = run({})
    spelled_out = run({name: values[0] for name, values in OFFICIAL_SWITCHES[method].items()})
    assert default.identity()["options"] == KEYED_BEFORE[method] == spelled_out.identity()["options"]
    assert default.key == spelled_out.key == run_key({**default.identity(), "options": KEYED_BEFORE[method]})
    assert variant_label(method, default.identity()["options"]) == ""
    for name, (_, official) in OFFICIAL_SWITCHES[method].items():
        switched = run({name: official})
        assert switched.identity()["options"] == {**KEYED_BEFORE[method], name: official} and switched.key != default.key
        text = official if isinstance(official, str) else json.dumps(official)  # as YAML writes it: false, official
        assert variant_label(method, switched.identity()["options"]) == f"{name}={text}"


def untimed(stats):
    """``stats`` without wall-clock entries (``seconds``, ``*_s``): those differ between any two runs."""
    if isinstance(stats, dict):
        return {k: untimed(v) for k, v in stats.items() if k != "seconds" and not k.endswith("_s")}
    if isinstance(stats, list):
        return [untimed(v) for v in stats]
    return stats


@pytest.mark.parametrize("method", [
    {"name": "rtn"}, {"name": "smoothquant"}, {"name": "omniquant", "epochs": 1}, {"name": "qllm", "epochs": 1, "grid_steps": 5},
], ids=lambda m: m["name"])
def test_same_seed_gives_bit_identical_metrics_on_cpu(method):
    """Determinism per method: the calibration draw, the training order and the initialisations all follow the seed."""
    config = parse_config({**TINY, "methods": [method], "bits": ["W4A4"], "seed": 1, "device": "cpu"})
    [run] = [r for r in plan(config) if r.method == method["name"]]
    first, second = execute(run, progress=False), execute(run, progress=False)
    assert first.metrics == second.metrics  # exact float equality, not approx
    assert untimed(first.stats) == untimed(second.stats) and first.key == second.key  # losses, thresholds, ...
    assert torch.are_deterministic_algorithms_enabled() is False  # bit-identical without asking torch for it


def test_threads_pin_each_run_are_recorded_and_leave_keys_and_results_unchanged():
    """``threads:`` sets torch's thread count for the run (recorded in its provenance, the process's own restored
    after); it is not part of the key, and GPTQ (the method whose factorizations depended on it) gives the same
    metrics at 1 and 2 threads."""
    gptq = {**TINY, "methods": [{"name": "gptq", "bits": ["W3A16"]}], "calibration": {"dataset": "brown", "samples": 2, "seqlen": 32}}
    one, two = (plan(parse_config({**gptq, "threads": n}))[1] for n in (1, 2))
    assert one.key == two.key == plan(parse_config(gptq))[1].key and (one.threads, two.threads) == (1, 2)
    before = torch.get_num_threads()
    records = [execute(run, progress=False) for run in (one, two)]
    assert torch.get_num_threads() == before
    assert [r.provenance["torch_threads"] for r in records] == [1, 2]
    assert records[0].metrics == records[1].metrics


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_threads_must_be_a_positive_integer(bad):
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^threads: .* is not allowed; use an integer"):
        parse_config({**TINY, "threads": bad})
