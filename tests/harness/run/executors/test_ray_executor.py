"""The Ray executor on a local Ray cluster (started once for the module; Ray startup is slow)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import ray

from harness.engine.allocator import TUNABLES, allocator_env
from harness.run.executors import make_executor
from harness.run.executors.base import Outcome
from harness.run.execute import plan
from harness.run.sweep import run_sweep
from tests.harness.run.executors.conftest import stored, tiny_sweep

pytestmark = pytest.mark.slow  # real processes or whole sweeps: outside the inner loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[4]  # the repository (tests/harness/run/executors/)
# A hub id that passes config validation but cannot load offline: its runs fail on the worker.
MISSING = "ptqbench-no-such-org/no-such-model"


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_sweep(ray_cluster, tmp_path_factory):
    """The tiny sweep plus a model at a missing path (whose runs must fail), run on Ray with 1 retry."""
    out = tmp_path_factory.mktemp("ray")
    config = tiny_sweep(models=["tiny-random-llama", MISSING], kind="ray", max_retries=1,
                        resources=[{"models": ["tiny-random-llama"], "cpus": 2, "mem_gb": 1}], host_allocator="compact")
    summary = run_sweep(config, out, progress=False)
    return config, out, summary


def test_ray_gives_the_same_metrics_as_local(ray_sweep, local_reference):
    config, out, summary = ray_sweep
    records = stored(out)
    assert set(local_reference) <= set(records) and len(local_reference) == 2
    runs = {r.key: r for r in plan(config)}
    for key, ref in local_reference.items():
        assert records[key]["metrics"]["ppl"]["brown"] == pytest.approx(ref["metrics"]["ppl"]["brown"], rel=1e-6)
        assert records[key]["provenance"]["executor"] == "ray"
        assert records[key]["provenance"]["allocator"][TUNABLES] == allocator_env("compact")[TUNABLES]  # the task's runtime_env
        assert records[key]["key"] == key  # the worker computed the same key as the driver
        # the task asked for its model's resources: both CPUs of this cluster and 1 GiB of Ray's memory resource
        assert records[key]["provenance"]["resources"] == {"task_name": f"ptqbench-{runs[key].slug}", "gpus": 0, "cpus": 2, "mem_gb": 1}
        log_text = (out / "logs" / f"{runs[key].slug}-{key}.log").read_text()  # written by the Ray worker
        assert f"(key {key}) started on" in log_text and f"run {runs[key].label} finished in" in log_text
    assert sorted(summary.done) == sorted(local_reference)


def test_failing_runs_are_reported_and_the_others_finish(ray_sweep):
    config, out, summary = ray_sweep
    missing = [r.key for r in plan(config) if r.model == MISSING]
    assert sorted(summary.failed) == sorted(missing) and len(missing) == 2
    for key in missing:
        assert not (out / "runs" / f"{key}.json").exists()
        assert MISSING in summary.failed[key] and (out / "failed" / f"{key}.json").is_file()


def test_rerun_skips_stored_runs(ray_sweep):
    config, out, first = ray_sweep
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    summary = run_sweep(config, out, progress=False)
    assert sorted(summary.skipped) == sorted(first.done)
    assert not summary.done and sorted(summary.failed) == sorted(first.failed)  # failed runs are tried again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before


def test_dead_workers_and_raising_tasks_are_retried_then_recorded(ray_cluster, tmp_path, caplog):
    runs = plan(tiny_sweep(bits=["W8A8", "W4A4"]))  # fp, rtn W8A8, rtn W4A4
    dies_once, always_raises, fine = runs
    marks = tmp_path / "attempts"
    marks.mkdir()

    def task(run, progress=False):  # shipped by value to the workers (a closure)
        n = len(list(marks.glob(f"{run.key}.*")))
        (marks / f"{run.key}.{n}").touch()
        if run.key == dies_once.key and n == 0:
            os._exit(1)  # the worker process dies mid-run
        if run.key == always_raises.key:
            raise RuntimeError("boom")  # escapes the task: Ray reports it as a RayTaskError
        return Outcome(record={"key": run.key})

    done, failed = {}, {}
    config = tiny_sweep(kind="ray", max_retries=1).executor
    with caplog.at_level(logging.WARNING), make_executor(config, tmp_path, progress=False, task=task) as ex:
        ex.run(runs, lambda r, rec: done.setdefault(r.key, rec), lambda r, o: failed.setdefault(r.key, o))
    assert sorted(done) == sorted([dies_once.key, fine.key])
    assert list(failed) == [always_raises.key] and "boom" in failed[always_raises.key].error
    attempts = {r.key: len(list(marks.glob(f"{r.key}.*"))) for r in runs}
    assert attempts == {dies_once.key: 2, always_raises.key: 2, fine.key: 1}
    retried = [m for m in caplog.messages if "retrying" in m]
    assert len(retried) == 2 and any("boom" in m for m in retried)



def test_auto_device_is_the_workers_device_not_the_drivers(ray_cluster, tmp_path):
    """On a CPU-only driver, runs that ask Ray for a GPU are keyed as CUDA runs (and vice versa)."""
    for num_gpus, device in ((None, "cpu"), (1, "cuda"), (0, "cpu")):  # this local cluster has no GPU
        with make_executor(tiny_sweep(kind="ray", ray={"num_gpus": num_gpus}).executor, tmp_path) as ex:
            assert ex.auto_device() == device
