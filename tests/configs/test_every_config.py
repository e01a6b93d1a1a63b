"""Every config under configs/ parses completely (methods, options, bit specs, overrides, models' widths)."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.run.config import load_config
from harness.run.execute import plan

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1] if p.parent.name == "paper" else p.parent)))
def test_config_parses_and_plans(path):
    config = load_config(path)
    assert plan(config), f"{path.name} plans no run"
