"""The throughput benchmark times the models a sweep evaluates (its rows are printed by `ptqbench bench`).

No timing thresholds: the fields must agree with each other and with the sweep's own runs of the same entries.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
from click.testing import CliRunner

from harness.bench.throughput import bench_config, bench_throughput
from harness.cli import main
from harness.run.config import parse_config
from harness.run.execute import execute, plan

SMALL = dict(windows=2, seqlen=32, dataset="brown", calibration_samples=2, calibration_seqlen=32, device="cpu", threads=None)


def test_rows_are_the_sweeps_runs(tmp_path):
    """Every row's perplexities are those ``ptqbench run`` stores for the same entries: the same effective bit spec
    (Q/K/V and the KV cache, QuaRot's quant_defaults), calibration windows and method (SmoothQuant calibrates)."""
    methods = ["rtn", "smoothquant", {"name": "quarot", "weight_solver": "rtn"}]
    rows = bench_throughput("tiny-random-llama", methods, ["W4A4", "W4A4KV4"], repeats=1, **SMALL)
    assert [(r.method, r.spec) for r in rows] == [(m, b) for m in ("rtn", "smoothquant", "quarot") for b in ("W4A4", "W4A4KV4")]
    for r in rows:
        assert r.tokens == 2 * 32 and r.fp_tokens_per_s > 0 and r.quant_tokens_per_s > 0 and math.isfinite(r.ratio)
        assert r.ratio == pytest.approx(r.quant_tokens_per_s / r.fp_tokens_per_s, rel=1e-12)  # one pair: its ratio
    runs = plan(parse_config(bench_config("tiny-random-llama", methods, ["W4A4", "W4A4KV4"], **SMALL), "bench"))
    stored = {}
    for run in runs:
        record = execute(replace(run, work_root=str(tmp_path)), progress=False)
        stored[(run.method, run.bits.name)] = record.metrics["ppl"]["brown"]
    for r in rows:
        assert r.fp_ppl == pytest.approx(stored[("fp", "W16A16")], rel=1e-5)
        assert r.quant_ppl == pytest.approx(stored[(r.method, r.spec)], rel=1e-5)
        assert r.quant_ppl != pytest.approx(r.fp_ppl, rel=1e-4)  # a quantized model is a different model
    quarot = {r.spec: r.quant_ppl for r in rows if r.method == "quarot"}
    assert quarot["W4A4"] != pytest.approx(quarot["W4A4KV4"], rel=1e-6)  # the KV part quantizes K and V (QuaRot: FP at W4A4)


def test_a_rotation_alone_is_the_fp_model():
    """QuaRot at W16A16 is the FP model through its online Hadamards: equal perplexity."""
    (r,) = bench_throughput("tiny-random-llama", [{"name": "quarot", "weight_solver": "rtn"}], ["W16A16"], repeats=1, **SMALL)
    assert r.quant_ppl == pytest.approx(r.fp_ppl, rel=1e-4) and r.quant_tokens_per_s > 0


def test_command_prints_a_row_per_method_and_spec():
    result = CliRunner().invoke(main, ["-q", "bench", "--model", "tiny-random-llama", "--methods", "rtn", "--bits", "W4A4,W8A8",
                                       "--windows", "1", "--seqlen", "16", "--repeats", "1", "--device", "cpu", "--clock", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[:2] for line in lines if line.startswith("rtn")] == [["rtn", "W4A4"], ["rtn", "W8A8"]]
    assert "cpu clock" in lines[0] and all(float(line.split()[2]) > 0 for line in lines if line.startswith("rtn"))


def test_an_unknown_clock_is_one_line():
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="^clock: 'sun' is not allowed; use one of wall, cpu$"):
        bench_throughput("tiny-random-llama", ["rtn"], ["W4A4"], repeats=1, clock="sun", **SMALL)


@pytest.mark.parametrize("methods, message", [("[", "--methods"), ("{a: 1}", "--methods"), ("nosuch", "unknown")])
def test_bad_methods_are_one_line(methods, message):
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-random-llama", "--methods", methods, "--device", "cpu"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
