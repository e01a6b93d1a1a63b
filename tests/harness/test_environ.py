"""harness.environ: variables set for a block, and each one's old value (or absence) back after."""
from __future__ import annotations

import os

from harness.environ import environment


def test_environment_is_restored_after_the_block(monkeypatch):
    monkeypatch.delenv("PTQBENCH_TEST_ABSENT", raising=False)
    monkeypatch.setenv("PTQBENCH_TEST_SET", "before")
    with environment({"PTQBENCH_TEST_ABSENT": "x", "PTQBENCH_TEST_SET": "y"}):
        assert os.environ["PTQBENCH_TEST_ABSENT"] == "x" and os.environ["PTQBENCH_TEST_SET"] == "y"
    assert "PTQBENCH_TEST_ABSENT" not in os.environ and os.environ["PTQBENCH_TEST_SET"] == "before"
