"""Tiny sweeps for the executor tests: the 2-layer random LLaMA, 2 windows of 64 tokens."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.run.config import SweepConfig, parse_config


def tiny_raw(models: list[str] | None = None, bits: list[str] | None = None, **executor: Any) -> dict:
    """The sweep as YAML would hold it (``SweepConfig.to_dict`` is not the YAML form of ``methods``)."""
    return {
        "name": "tiny",
        "device": "cpu",
        "models": models or ["tiny-random-llama"],
        "methods": ["rtn"],
        "bits": bits or ["W4A4"],
        "calibration": {"samples": 2, "seqlen": 64},
        "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 64, "max_windows": 2}},
        "executor": executor,
    }


def tiny_sweep(models: list[str] | None = None, bits: list[str] | None = None, **executor: Any) -> SweepConfig:
    return parse_config(tiny_raw(models, bits, **executor))


def stored(out: Path) -> dict[str, dict]:
    """Stored records by run key."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory) -> dict[str, dict]:
    """The tiny sweep run by the local executor: what every other executor must reproduce."""
    from harness.run.sweep import run_sweep

    out = tmp_path_factory.mktemp("local")
    summary = run_sweep(tiny_sweep(), out, progress=False)
    assert len(summary.done) == 2 and not summary.failed  # fp and rtn W4A4
    return stored(out)
