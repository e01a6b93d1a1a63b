"""configs/paper/ plans exactly the published cells we can run, with the paper's protocol.

Read as plain YAML: the methods (smoothquant, os+, omniquant, qllm) and ``evaluation.zeroshot`` come
from plugins and sections that may not be installed where this test runs.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from harness.report import paper

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "paper"


def planned(config: dict) -> set[tuple[str, str, str]]:
    cells = set()
    for entry in config["methods"]:
        entry = {"name": entry} if isinstance(entry, str) else entry
        for bits in entry.get("bits") or config["bits"]:
            cells |= {(model, entry["name"], bits) for model in config["models"]}
    return cells


def test_table1_config_covers_every_runnable_published_cell():
    config = yaml.safe_load((CONFIGS / "qllm_table1.yaml").read_text())
    ref = paper.load_reference()
    external = {c["method"] for c in yaml.safe_load(paper.REFERENCE_FILE.read_text())["columns"] if c.get("ptqbench") is False}
    assert external == {"llm-qat", "llm-qat+sq"}
    published = {(c.zoo, c.method, c.bits) for c in ref.cells.itertuples() if c.method not in external | {"fp"}}
    assert planned(config) == published  # fp is always part of a sweep
    assert config["calibration"] == {"dataset": "wikitext2", "samples": 128, "seqlen": 2048}
    assert config["evaluation"]["ppl"] == {"datasets": ["wikitext2", "c4"], "seqlen": ref.ppl_seqlen, "max_windows": None}
    assert tuple(config["evaluation"]["zeroshot"]["tasks"]) == ref.tasks


def test_training_cost_config_matches_the_published_cost_table():
    config = yaml.safe_load((CONFIGS / "qllm_training_cost.yaml").read_text())
    ref = paper.load_reference()
    assert planned(config) == {(c.zoo, c.method, c.bits) for c in ref.cost.itertuples()}
    assert config["calibration"] == yaml.safe_load((CONFIGS / "qllm_table1.yaml").read_text())["calibration"]


def test_table1_overrides_reach_the_runs():
    """The official per-model scripts' settings land in the planned runs (options, hence keys and records)."""
    from harness.run.config import load_config
    from harness.run.execute import plan

    runs = {(r.model, r.method, r.bits.name): r for r in plan(load_config(CONFIGS / "qllm_table1.yaml"))}
    qllm_lr = {k[0::2]: r.config.lr for k, r in runs.items() if k[1] == "qllm"}
    assert qllm_lr[("llama-2-70b", "W4A4")] == qllm_lr[("llama-2-70b", "W6A6")] == 1e-4
    assert qllm_lr[("llama-2-7b", "W4A4")] == qllm_lr[("llama-2-13b", "W6A6")] == 1e-4
    assert qllm_lr[("llama-2-7b", "W6A6")] == qllm_lr[("llama-2-13b", "W4A4")] == qllm_lr[("llama-7b", "W4A4")] == 5e-4
    omni = {k[0::2]: r.config for k, r in runs.items() if k[1] == "omniquant"}
    assert (omni[("llama-2-7b", "W4A4")].alpha, omni[("llama-2-7b", "W4A4")].let_lr) == (0.75, 1e-3)
    assert (omni[("llama-2-7b", "W6A6")].alpha, omni[("llama-2-7b", "W6A6")].let_lr) == (0.5, 5e-3)
    assert all(omni[(m, "W4A4")].aug_loss for m in ("llama-7b", "llama-13b", "llama-30b", "llama-65b"))
    assert not omni[("llama-2-7b", "W4A4")].aug_loss and not omni[("llama-7b", "W6A6")].aug_loss
    assert omni[("llama-30b", "W4A4")].alpha == 0.75 and omni[("llama-13b", "W4A4")].alpha == 0.5
    assert {m for (m, _), c in omni.items() if c.let_attention == "off"} == {"llama-2-70b"}
    assert all(r.seed == 2 for r in runs.values())
    assert all(r.bits.quantizes_attention for k, r in runs.items() if k[1] != "fp")
    assert runs[("llama-2-70b", "qllm", "W4A4")].identity()["options"]["lr"] == 1e-4
