"""configs/official-omniquant-qllm-w4a4.yaml: the check against the official codes (docs/fidelity.md), with every switch official."""
from __future__ import annotations

from pathlib import Path

from harness.run.config import load_config
from harness.run.execute import plan

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "official-omniquant-qllm-w4a4.yaml"


def test_official_config_is_the_readme_setting_with_the_official_switches():
    config = load_config(CONFIG)
    runs = {r.method: r for r in plan(config)}
    assert sorted(runs) == ["fp", "omniquant", "qllm", "rtn"]
    assert all(r.model == "smollm2-135m" and r.attention_kernel == "eager" and r.device == "cpu" for r in runs.values())
    assert {r.bits.name for m, r in runs.items() if m != "fp"} == {"W4A4"} and runs["rtn"].bits.quantizes_attention
    calibration, ppl = config.calibration, config.evaluation.ppl
    assert (calibration.dataset, calibration.samples, calibration.seqlen) == ("brown", 16, 256)
    assert (tuple(ppl.datasets), ppl.seqlen, ppl.max_windows) == (("brown",), 256, 40)
    omni, qllm = runs["omniquant"].config, runs["qllm"].config
    assert (omni.epochs, omni.let_attention, omni.let_init, omni.shuffle, omni.zero_point_grad) == (
        2, "off", "official", False, "none")
    assert (qllm.blocks_per_job, qllm.epochs, qllm.search_order, qllm.noop_candidate, qllm.zero_point_grad, qllm.shuffle) == (
        2, 1, "official", False, "none", True)  # the official QLLM loop shuffles
