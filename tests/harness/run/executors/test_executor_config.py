"""The ``executor:`` section, ``--executor`` / ``--ray-address`` precedence, and missing extras."""
from __future__ import annotations

import sys

import pytest
import yaml
from click.testing import CliRunner

from harness.cli import main
from harness.cli.run import with_executor
from harness.errors import ConfigError, ResourceUnavailableError
from harness.run.executors import make_executor
from harness.run.execute import plan
from harness.run.executor_config import ExecutorConfig, Resources
from tests.harness.run.executors.conftest import tiny_raw, tiny_sweep


def test_defaults_are_local_and_the_section_round_trips():
    config = tiny_sweep()
    assert config.executor == ExecutorConfig() and config.executor.kind == "local"
    custom = tiny_sweep(kind="slurm", max_retries=3, slurm={"partition": "gpu", "extra": {"account": "p1"}})
    assert tiny_sweep(**custom.to_dict()["executor"]) == custom


def test_the_executor_is_not_part_of_a_run_key():
    sweeps = [tiny_sweep(kind=kind) for kind in ("local", "ray", "slurm")]
    sweeps.append(tiny_sweep(kind="slurm", resources=[{"gpus": 2, "mem_gb": 128}], slurm={"max_concurrent": 2}))
    keys = [[r.key for r in plan(sweep)] for sweep in sweeps]
    assert keys[0] == keys[1] == keys[2] == keys[3]


def test_resources_match_by_model_and_bits_and_later_entries_win_field_by_field():
    big = "ptqbench-no-such-org/no-such-model"  # a hub id that passes validation offline
    config = tiny_sweep(models=["tiny-random-llama", big], bits=["W8A8", "W4A4"], kind="slurm", resources=[
        {"models": [big], "gpus": 2, "mem_gb": 128},
        {"bits": ["w4a4"], "time_min": 900},          # any spelling of a sweep's bit spec; stored canonical
        {"models": [big], "bits": ["W4A4"], "mem_gb": 256, "partition": "bigmem"},
    ]).executor
    assert config.resources[1].bits == ("W4A4",)
    assert config.resources_for(big, "W4A4") == Resources(gpus=2, mem_gb=256, time_min=900, partition="bigmem")
    assert config.resources_for(big, "W8A8") == Resources(gpus=2, mem_gb=128)
    assert config.resources_for(big, "W16A16") == Resources(gpus=2, mem_gb=128)  # the FP baseline run
    assert config.resources_for("tiny-random-llama", "W4A4") == Resources(time_min=900)
    assert config.resources_for("tiny-random-llama", "W8A8") == Resources()  # the executor's own defaults
    models, bits = ["tiny-random-llama", big], ["W8A8", "W4A4"]
    sweep = tiny_sweep(models, bits, kind="slurm", resources=[{"models": [big], "gpus": 2}])
    assert tiny_sweep(models, bits, **sweep.to_dict()["executor"]) == sweep  # round-trips through YAML


@pytest.mark.parametrize("section, message", [
    ({"kind": "dask"}, r"executor.kind: 'dask' is not allowed; use one of \['local', 'ray', 'slurm'\]"),
    ({"max_retries": -1}, r"executor.max_retries: -1 is not allowed"),
    ({"host_allocator": "jemalloc"}, r"executor.host_allocator: 'jemalloc' is not allowed; use one of \['default', 'compact'\]"),
    ({"host_allocator": "compact", "isolate": False}, r"executor.host_allocator: compact needs isolate: true with kind: local"),
    ({"ray": {"num_gpu": 1}}, r"executor.ray.num_gpu: unknown option \(did you mean 'num_gpus'\?\)"),
    ({"ray": {"num_cpus": 0}}, r"executor.ray.num_cpus: 0.0 is not allowed"),
    ({"slurm": {"cluster": "pbs"}}, r"executor.slurm.cluster: 'pbs' is not allowed"),
    ({"slurm": {"time_min": 0}}, r"executor.slurm.time_min: 0 is not allowed"),
    ({"slurm": {"max_concurrent": 0}}, r"executor.slurm.max_concurrent: 0 is not allowed; use a positive integer or null"),
    ({"resources": [{"models": ["llama-2-70b"], "gpus": 1}]},
     r"executor.resources\[0\].models\[0\]: 'llama-2-70b' is not a model of this sweep; use one of \['tiny-random-llama'\]"),
    ({"resources": [{"bits": ["W3A3"], "gpus": 1}]}, r"executor.resources\[0\].bits\[0\]: W3A3 is not a bit spec of this sweep"),
    ({"resources": [{"bits": ["W4Q4"], "gpus": 1}]}, r"executor.resources\[0\].bits\[0\]"),
    ({"resources": [{"gpu": 1}]}, r"executor.resources\[0\].gpu: unknown option \(did you mean 'gpus'\?\)"),
    ({"resources": [{"gpus": 1}, {"mem_gb": 0}]}, r"executor.resources\[1\].mem_gb: 0 is not allowed; use a positive integer or null"),
    ({"resources": [{"gpus": -1}]}, r"executor.resources\[0\].gpus: -1 is not allowed"),
    ({"resources": [{"models": ["tiny-random-llama"]}]}, r"executor.resources\[0\]: asks for nothing; set gpus, cpus"),
])
def test_bad_fields_name_the_field(section, message):
    with pytest.raises(ConfigError, match=message):
        tiny_sweep(**section)


def test_cli_flags_override_the_yaml():
    yaml_ray = tiny_sweep(kind="ray", ray={"address": "ray://head:10001", "num_cpus": 4})
    assert with_executor(yaml_ray, None, None) == yaml_ray
    assert with_executor(yaml_ray, "local", None).executor.kind == "local"
    joined = with_executor(tiny_sweep(), None, "auto").executor  # --ray-address alone implies ray
    assert (joined.kind, joined.ray.address) == ("ray", "auto")
    kept = with_executor(yaml_ray, None, "auto").executor
    assert (kept.ray.address, kept.ray.num_cpus) == ("auto", 4.0)
    with pytest.raises(ConfigError, match="--ray-address: only used with --executor ray"):
        with_executor(yaml_ray, "slurm", "auto")


@pytest.mark.parametrize("kind, module", [("ray", "ray"), ("slurm", "submitit")])
def test_a_missing_extra_is_one_line_naming_it(kind, module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ResourceUnavailableError, match=rf"pip install 'ptqbench\[{kind}\]'"):
        make_executor(tiny_sweep(kind=kind).executor, tmp_path)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()))
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "out"), "--executor", kind])
    assert result.exit_code == 2
    assert f"pip install 'ptqbench[{kind}]'" in result.output and "Traceback" not in result.output
