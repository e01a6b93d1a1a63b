"""harness.bench.scale: what ``--methods`` accepts (the benchmark itself is a command, not a test)."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.bench.scale import method_options, run_spec
from harness.cli import main
from harness.errors import ConfigError


def test_a_variant_adds_its_options_to_the_methods_benchmark_options(tmp_path):
    assert method_options("qllm") == ("qllm", {"epochs": 1, "grid_steps": 10})
    assert method_options("rtn:") == ("rtn", {})  # an empty variant is the method itself
    assert method_options("qllm:low-memory") == ("qllm", {"epochs": 1, "grid_steps": 10, "low_memory": True})
    spec = run_spec(Path("model"), "omniquant:low-memory", 4, 128, 2, tmp_path)
    assert spec.method == "omniquant" and spec.config.low_memory and spec.config.epochs == 1


@pytest.mark.parametrize("label", ["gptq", "qllm:fast", "low-memory"])
def test_a_bad_label_is_refused_before_any_model_is_generated(label, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="--methods: .* is not allowed"):
        method_options(label)
    monkeypatch.setenv("PTQBENCH_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["bench-scale", "--methods", f"rtn,{label}"])
    assert result.exit_code == 2 and "Error: --methods:" in result.output
    assert not (tmp_path / "bench-scale").exists()
