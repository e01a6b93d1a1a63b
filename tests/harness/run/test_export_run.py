"""Exporting stored runs: `export: true` in a sweep, `ptqbench export RUN`, and `ptqbench eval` of the result.

The chain is checked end to end against the sweep's own number: the exported folder, evaluated by
`ptqbench eval`, must give the perplexity the sweep recorded for that run (same windows).
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.errors import ConfigError
from harness.run.results import ResultStore
from harness.run.sweep import run_sweep
from tests.harness.run.executors.conftest import tiny_sweep

pytestmark = pytest.mark.slow  # real processes or whole sweeps: outside the inner loop (-m "not slow")


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


TEXT = ("A kept model is exported as it was evaluated, and a changed input is named when a run is rebuilt. " * 40 + "\n") * 3


def local_text_sweep(tmp_path, **extra):
    from harness.run.config import parse_config
    from tests.harness.run.executors.conftest import tiny_raw

    text = tmp_path / "data.txt"
    text.write_text(TEXT)
    raw = tiny_raw(bits=["W4A16"])
    raw["calibration"]["dataset"] = str(text)
    raw["evaluation"]["ppl"]["datasets"] = [str(text)]
    return parse_config({**raw, **extra}), text


def quantized_record(out):
    return next(r for r in ResultStore(out).records() if not r.baseline)


def test_export_of_an_unchanged_run_says_same_key_and_a_changed_data_file_is_named(tmp_path, caplog):
    from harness.run.export_run import export_run

    config, text = local_text_sweep(tmp_path)
    run_sweep(config, tmp_path / "out", progress=False)
    record = quantized_record(tmp_path / "out")
    with caplog.at_level("INFO", logger="harness.run.export_run"):
        export_run(record, tmp_path / "a", progress=False)
    assert f"same key {record.key}" in caplog.text

    caplog.clear()
    was = record.provenance["inputs"][str(text)]
    text.write_text(TEXT + "One more line.\n")
    with caplog.at_level("INFO", logger="harness.run.export_run"):
        export_run(record, tmp_path / "b", progress=False)
    (line,) = [r.getMessage() for r in caplog.records if "differs from the stored" in r.getMessage()]
    assert f"changed input: {text} (was {was}, now sha256:" in line


def test_keep_quantized_keeps_the_model_and_export_copies_it_without_quantizing(tmp_path, monkeypatch):
    import harness.run.export_run

    config, _ = local_text_sweep(tmp_path, keep_quantized=True)
    summary = run_sweep(config, tmp_path / "out", progress=False)
    assert len(summary.done) == 2 and not summary.failed
    record = quantized_record(tmp_path / "out")
    kept = tmp_path / "out" / "quantized" / record.key
    assert sorted(p.name for p in (tmp_path / "out" / "quantized").iterdir()) == [record.key]  # not the FP baseline
    assert json.loads((kept / "ptqbench_export.json").read_text())["format"] == "compressed-tensors/pack-quantized"

    def no_quantization(*args, **kwargs):
        raise AssertionError("export quantized the run again instead of copying the kept model")

    monkeypatch.setattr(harness.run.export_run, "load_model", no_quantization)
    result = CliRunner().invoke(main, ["export", record.key, "--results", str(tmp_path / "out"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x" / "model.safetensors").read_bytes() == (kept / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "x" / "ptqbench_export.json").read_text())["source"]["metrics"]["ppl"] == record.ppl

    data = str(tmp_path / "data.txt")
    evaluated = CliRunner().invoke(main, ["eval", str(tmp_path / "x"), "--ppl", data, "--seqlen", "64", "--max-windows", "2",
                                          "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    (again,) = ResultStore(tmp_path / "eval").records()
    assert abs(again.ppl[data] - record.ppl[data]) / record.ppl[data] < 1e-3, (again.ppl, record.ppl)


def test_keep_quantized_per_method_wins_over_the_sweep(tmp_path):
    from harness.run.config import parse_config
    from harness.run.execute import plan
    from tests.harness.run.executors.conftest import tiny_raw

    raw = {**tiny_raw(), "keep_quantized": True, "methods": [{"name": "rtn", "keep_quantized": False}, "smoothquant"]}
    keep = {r.method: r.keep_quantized for r in plan(parse_config(raw)) if r.method != "fp"}
    assert keep == {"rtn": False, "smoothquant": True}
    raw["methods"][0]["keep_quantized"] = "yes"
    with pytest.raises(ConfigError, match=r"^methods\[0\]\.keep_quantized: 'yes' is not allowed; use true or false$"):
        parse_config(raw)
