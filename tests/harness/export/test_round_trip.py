"""A saved model evaluates to the number its run reported.

Every registered method (a plugin's included) x W4A16, W4A4, W4A4KV4 on tiny-random-llama: the run is
planned from a sweep config (``parse_config`` + ``plan``: the method's ``quant_defaults`` and the sweep's
``quant.attention: auto`` give the run's effective bit spec) and executed by the sweep's own ``execute`` with
``keep_quantized``; the kept folder, loaded back with ``load_quantized``, is scored by the run's evaluation
function (``evaluate_model``) on the same windows and must give the stored perplexity. The reference number
is the run's own record, never a number of this test's earlier runs. A pair a method refuses (its ``check``)
must be refused by the sweep config in one line.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from harness.errors import ConfigError
from harness.evaluation.evaluate import evaluate_model
from harness.export.formats import CT_INT, CT_PACKED, MANIFEST, PTQBENCH
from harness.export.loader import load_quantized
from harness.registry import REGISTRY, get_method
from harness.run.config import parse_config
from harness.run.execute import RunSpec, execute, plan, quantized_dir

CPU = torch.device("cpu")
BITS = ["W4A16", "W4A4", "W4A4KV4"]
# Baselines are left out of the parametrisation, not skipped: they quantize nothing, so a sweep keeps no model of
# theirs to export (harness.run.execute.keep_model). Every other registered method is covered as it registers.
METHODS = [name for name in REGISTRY.names() if not get_method(name).is_baseline]
# Small settings where a method's defaults take long on CPU (as tests/methods/* use them); others run as configured.
# QuaRot rounds with RTN here: its rotation, online transforms and K-cache quantizer are what the export must keep,
# and GPTQ's rounding is covered by the gptq method.
SMALL = {
    "omniquant": {"epochs": 1, "max_samples": 1},
    "qllm": {"grid_steps": 4, "epochs": 1, "blocks_per_job": 2, "rank": 2},
    "awq": {"n_grid": 2, "clip_grid": 2, "clip_tokens": 32, "search_samples": 1},
    "os+": {"min_steps": 2, "step_unit": 1000.0, "search_samples": 1},
    "quarot": {"weight_solver": "rtn"},
    "spinquant": {"steps": 2, "weight_solver": "rtn"},
}
# exp of a mean NLL over 2 x 63 tokens: the reload computes the same float operations, so only rounding may differ
REL = 1e-6


def sweep(method: str, bits: str, **extra) -> dict:
    """A one-method sweep as its YAML holds it: the tiny model, 2 calibration and 2 evaluation windows of 64 tokens."""
    return {
        "name": "round-trip", "device": "cpu", "models": ["tiny-random-llama"],
        "methods": [{"name": method, **SMALL.get(method, {})}], "bits": [bits], "keep_quantized": True,
        "calibration": {"samples": 2, "seqlen": 64},
        "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 64, "max_windows": 2}}, **extra,
    }


def the_run(raw: dict, tmp_path: Path) -> RunSpec:
    """The sweep's one quantized run, with its work and kept-model folders under ``tmp_path``."""
    (run,) = [r for r in plan(parse_config(raw)) if not r.method_class.is_baseline]
    return dataclasses.replace(run, work_root=str(tmp_path / "work"), quantized_root=str(tmp_path / "quantized"))


def reloaded_ppl(folder: Path, run: RunSpec) -> float:
    from transformers import AutoTokenizer

    model = load_quantized(folder)
    metrics = evaluate_model(model, AutoTokenizer.from_pretrained(folder), run.evaluation, device=CPU, progress=False)
    return metrics["ppl"]["brown"]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
def test_kept_model_evaluates_to_the_runs_perplexity(method, bits, tmp_path, monkeypatch):
    raw = sweep(method, bits)
    try:
        run = the_run(raw, tmp_path)
    except ConfigError as err:  # a pair the method refuses: refused by the sweep before any work, in one line
        assert "\n" not in str(err)
        monkeypatch.setattr(get_method(method), "check", lambda self, spec: None)
        the_run(raw, tmp_path)  # and refused by the method's check, nothing else
        return
    record = execute(run, progress=False)
    folder = quantized_dir(run)
    assert json.loads((folder / "ptqbench_export.json").read_text())["source"]["key"] == record.key

    assert reloaded_ppl(folder, run) == pytest.approx(record.ppl["brown"], rel=REL, abs=0)

    if (folder / MANIFEST).is_file():  # the manifest quantizes with the run's effective spec, not the short string
        manifest = json.loads((folder / MANIFEST).read_text())
        assert {json.dumps(e["spec"], sort_keys=True) for e in manifest["linears"].values()} == {
            json.dumps(run.bits.to_dict(), sort_keys=True)}
        quantized_qkv = run.bits.quantizes_attention or run.bits.quantizes_kv
        assert len(manifest["attention"]) == (2 if quantized_qkv and run.bits.attention_scope == "head" else 0)


def test_the_parametrisation_covers_what_the_sweep_quantizes(tmp_path):
    """The attention and KV-cache cases this file exists for are really in it: RTN quantizes Q/K/V at W4A4 (attention
    auto), QuaRot's defaults leave Q FP and quantize the K cache after the Hadamard on Q and K at W4A4KV4."""
    assert the_run(sweep("rtn", "W4A4"), tmp_path).bits.quantizes_attention
    quarot = the_run(sweep("quarot", "W4A4KV4"), tmp_path).bits
    assert quarot.quantizes_kv and not quarot.quantizes_attention and quarot.a_clip == 0.9 and quarot.kv_sym is False
    assert {"rtn", "quarot"} <= set(METHODS)


@pytest.mark.parametrize("method, bits, extra, fmt, reason", [
    # SmoothQuant's scope: the q/k/v outputs per token over all heads
    ("smoothquant", "W8A8", {"quant": {"attention_scope": "projection"}}, PTQBENCH, "quantizes its output"),
    # the KV cache alone, at weight-only bits
    ("rtn", "W4A16KV4", {}, PTQBENCH, "quantizes its attention inputs"),
    # the kernel behind the quantizers is the run's
    ("rtn", "W4A4", {"attention_kernel": "eager"}, PTQBENCH, "4-bit activations"),
    # int8 activations with Q/K/V quantized (attention: auto): beyond what compressed-tensors declares
    ("rtn", "W8A8", {}, PTQBENCH, "quantizes its attention inputs"),
    # the linears alone at int8 activations: compressed-tensors, read back with ptqbench's activation quantizers
    ("rtn", "W8A8", {"quant": {"attention": False}}, CT_INT, ""),
    ("rtn", "W4A8", {"quant": {"attention": False, "weight_symmetric": True}}, CT_PACKED, ""),
])
def test_scheme_variants_evaluate_to_the_runs_perplexity(method, bits, extra, fmt, reason, tmp_path):
    run = the_run(sweep(method, bits, **extra), tmp_path)
    record = execute(run, progress=False)
    folder = quantized_dir(run)
    info = json.loads((folder / "ptqbench_export.json").read_text())
    assert info["format"] == fmt and reason in info["reason"]
    assert info["attention_kernel"] == run.attention_kernel
    assert reloaded_ppl(folder, run) == pytest.approx(record.ppl["brown"], rel=REL, abs=0)


def test_cli_export_then_eval_prints_the_runs_perplexity(tmp_path):
    """``ptqbench export KEY`` of a stored RTN W4A4 run (Q/K/V quantized: ``attention: auto``; no kept model, so the
    run is quantized again) then ``ptqbench eval`` of the folder prints the run's perplexity."""
    from harness.cli import main
    from harness.run.results import ResultStore

    run = the_run(sweep("rtn", "W4A4", keep_quantized=False), tmp_path)
    record = execute(run, progress=False)
    ResultStore(tmp_path / "out").write(record.key, record)

    exported = CliRunner().invoke(main, ["export", record.key, "--results", str(tmp_path / "out"), "--out", str(tmp_path / "x")])
    assert exported.exit_code == 0, exported.output
    assert "ptqbench format because W4A4: 4-bit activations" in exported.output
    evaluated = CliRunner().invoke(main, ["eval", str(tmp_path / "x"), "--ppl", "brown", "--seqlen", "64", "--max-windows", "2",
                                          "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    assert f"ppl brown: {record.ppl['brown']:.4f}" in evaluated.output
    (again,) = ResultStore(tmp_path / "eval").records()
    assert (again.method, again.bits) == ("rtn", "W4A4")
    assert again.ppl["brown"] == pytest.approx(record.ppl["brown"], rel=REL, abs=0)
