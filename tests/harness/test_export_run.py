"""Exporting stored runs: `export: true` in a sweep, `ptqbench export RUN`, and `ptqbench eval` of the result.

The chain is checked end to end against the sweep's own number: the exported folder, evaluated by
`ptqbench eval`, must give the perplexity the sweep recorded for that run (same windows).
"""
from __future__ import annotations

import json

from click.testing import CliRunner

from harness.cli import main
from harness.results import ResultStore
from harness.sweep import run_sweep
from tests.harness.executors.conftest import tiny_sweep


def test_sweep_export_then_eval_reproduces_the_recorded_perplexity(tmp_path):
    import dataclasses

    config = dataclasses.replace(tiny_sweep(bits=["W4A16"]), export=True)
    summary = run_sweep(config, tmp_path / "out", progress=False)
    assert len(summary.done) == 2 and not summary.failed and not summary.export_failed
    (key,) = summary.exported  # the quantized run; the FP baseline is not exported
    record = ResultStore(tmp_path / "out").read(tmp_path / "out" / "runs" / f"{key}.json")
    folder = tmp_path / "out" / "export" / key
    info = json.loads((folder / "ptqbench_export.json").read_text())
    # asymmetric weight-only (the default): compressed-tensors, packed 4-bit weights; `eval` loads it with transformers
    assert info["format"] == "compressed-tensors/pack-quantized" and info["source"]["key"] == key

    result = CliRunner().invoke(main, ["eval", str(folder), "--ppl", "brown", "--seqlen", "64", "--max-windows", "2",
                                       "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    (evaluated,) = ResultStore(tmp_path / "eval").records()
    assert (evaluated.method, evaluated.bits, evaluated.model) == ("rtn", "W4A16", record.model)
    ours, theirs = record.ppl["brown"], evaluated.ppl["brown"]
    assert abs(theirs - ours) / ours < 1e-3, (ours, theirs)


def test_cli_export_by_key_prints_format_and_size(tmp_path):
    summary = run_sweep(tiny_sweep(bits=["W4A4"]), tmp_path / "out", progress=False)
    key = next(k for k in summary.done if ResultStore(tmp_path / "out").read(tmp_path / "out" / "runs" / f"{k}.json").method == "rtn")
    result = CliRunner().invoke(main, ["export", key, "--results", str(tmp_path / "out"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert "ptqbench, " in result.output and "bytes" in result.output and "4-bit activations" in result.output
    assert (tmp_path / "x" / "ptqbench_quant.json").is_file()
    again = CliRunner().invoke(main, ["export", key, "--results", str(tmp_path / "out"), "--out", str(tmp_path / "x")])
    assert again.exit_code == 2 and "exists and is not empty" in again.output


def test_cli_export_unknown_run_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["export", "0123456789abcdef", "--results", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "RUN: '0123456789abcdef' is neither" in result.output
