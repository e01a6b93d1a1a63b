"""``ptqbench bench-methods``: the shipped official timings are runnable settings, and the bench times ptqbench's side.

No timing thresholds: the printed seconds are what the quantize phase took; the perplexity must equal
an independent run of the same method on the same windows.
"""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import harness.bench.methods as bench
from harness import BitSpec, QuantContext, get_method
from harness.cli import main
from harness.data.windows import calibration_windows, eval_windows
from harness.errors import ConfigError
from harness.evaluation.evaluate import perplexity
from harness.models import load_model
from harness.run.config import parse_config

TINY = bench.OfficialSeconds(
    machine="test", date="2026-12-07", model="tiny-random-llama",
    calibration={"dataset": "brown", "samples": 4, "seqlen": 32},
    evaluation={"ppl": {"datasets": ["brown"], "seqlen": 32, "max_windows": 2}},
    timings=(bench.OfficialTiming(method="gptq", bits="W4A16", official="test", official_s=2.0, official_ppl=1.0, goal=0.7,
                                  threads=1, conditions="alone"),
             bench.OfficialTiming(method="rtn", bits="W4A4", official="test", official_s=1.0, official_ppl=1.0, goal=1.0,
                                  threads=1, conditions="alone")))


def test_every_shipped_timing_is_a_runnable_sweep_of_a_registered_method():
    reference = bench.load_official()
    assert reference.timings and reference.model
    for timing in reference.timings:
        config = parse_config(bench.sweep_config(reference, timing), "official_seconds.yaml")  # options and bits validate
        assert get_method(timing.method).name == timing.method
        assert [m.name for m in config.methods] == [timing.method] and timing.official_s > 0 and 0 < timing.goal <= 1
        assert timing.threads >= 1 and timing.conditions


def test_an_unknown_method_is_one_line_naming_the_timed_ones():
    with pytest.raises(ConfigError, match=r"^--methods: nope has no official timing; use some of gptq, rtn$"):
        bench.select(TINY, ("nope",))
    assert [t.method for t in bench.select(TINY, ("rtn",))] == ["rtn"]
    assert len(bench.select(TINY, ())) == 2


def test_bench_times_the_method_and_its_perplexity_matches_an_independent_run():
    (result,) = bench.bench_methods(("gptq",), threads=1, progress=False, reference=TINY)
    assert result.seconds > 0 and result.ratio == pytest.approx(result.seconds / 2.0)
    loaded = load_model("tiny-random-llama", dtype="float32", device="cpu")
    calib = calibration_windows("brown", loaded.tokenizer, 4, 32, 0)
    torch.manual_seed(0)
    model = get_method("gptq")().quantize(loaded.model, BitSpec.parse("W4A16"), calib,
                                          QuantContext(device=torch.device("cpu"), progress=False)).model
    ppl = perplexity(model, eval_windows("brown", loaded.tokenizer, 32, 2), device=torch.device("cpu"), progress=False)
    assert result.ppl == pytest.approx(ppl, rel=1e-5)


def test_cli_prints_a_row_per_timing_with_both_seconds(monkeypatch):
    monkeypatch.setattr("harness.cli.bench_methods.load_official", lambda: TINY)
    result = CliRunner().invoke(main, ["bench-methods", "--methods", "rtn", "--threads", "1"])
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.output.splitlines() if line.startswith("rtn W4A4")]
    ours, official, ratio = (float(v) for v in row.split()[3:6])
    assert official == 1.0 and ratio == pytest.approx(ours / official, abs=0.051)  # seconds print to 0.1, the ratio to 0.01
