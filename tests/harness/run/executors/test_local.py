"""The local executor: today's loop, and a killed driver that resumes without redoing runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.engine.allocator import TUNABLES, allocator_env
from harness.run.executors import make_executor
from harness.run.executors.base import Outcome
from harness.method import Method, MethodConfig, QuantizeResult
from harness.run.config import parse_config
from harness.run.execute import plan
from harness.run.sweep import run_sweep
from tests.harness.run.executors.conftest import stored, tiny_raw, tiny_sweep

pytestmark = pytest.mark.slow  # real processes or whole sweeps: outside the inner loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[4]  # the repository (tests/harness/run/executors/)


def test_runs_in_order_and_each_is_stored_before_the_next_starts(tmp_path):
    runs = plan(tiny_sweep(bits=["W8A8", "W4A4"]))
    events = []

    def task(run, progress=False):
        events.append(("start", run.key))
        return Outcome(record={"key": run.key}) if run is not runs[1] else Outcome(error="RuntimeError: boom")

    config = tiny_sweep(kind="local", max_retries=3).executor
    with make_executor(config, tmp_path, progress=False, task=task) as ex:
        ex.run(runs, lambda r, rec: events.append(("done", r.key)), lambda r, o: events.append(("failed", r.key)))
    a, b, c = (r.key for r in runs)
    # local never retries within a sweep (max_retries is for lost workers and jobs), and runs strictly in turn
    assert events == [("start", a), ("done", a), ("start", b), ("failed", b), ("start", c), ("done", c)]


def test_the_compact_allocator_reaches_each_runs_process_and_changes_no_result(tmp_path, local_reference):
    driver = os.environ.get(TUNABLES)
    summary = run_sweep(tiny_sweep(host_allocator="compact"), tmp_path, progress=False)
    assert sorted(summary.done) == sorted(local_reference) and not summary.failed
    for key, record in stored(tmp_path).items():
        assert record["provenance"]["allocator"][TUNABLES] == allocator_env("compact")[TUNABLES]
        assert local_reference[key]["provenance"]["allocator"][TUNABLES] == driver  # the default adds nothing
        assert record["metrics"] == local_reference[key]["metrics"]
    assert os.environ.get(TUNABLES) == driver  # only the runs' processes had it


def test_killed_driver_resumes_without_redoing_finished_runs(tmp_path):
    """`ptqbench run` killed right after its first stored result, then started again."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(bits=["W8A8", "W4A4"])))  # 3 runs with the FP baseline
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "harness.cli", "run", str(path), "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "runs").glob("*.json")) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    first = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "runs").glob("*.json")}
    assert 1 <= len(first) < 3, "the driver must be killed mid-sweep for this test to mean anything"

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{3 - len(first)} run, {len(first)} already done, 0 failed" in again.stdout
    files = list((out / "runs").glob("*.json"))
    assert len(files) == 3
    assert {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in files if p.name in first} == first


class PidMethod(Method):
    """Records the process it quantized in; registered at runtime, so the run's process must register it too."""

    name = "pid-probe"
    config_class = MethodConfig

    def quantize(self, model, spec, calibration, context):
        return QuantizeResult(model, {"pid": os.getpid()})


def test_each_run_executes_in_its_own_process(tmp_path, monkeypatch):
    from harness.registry import REGISTRY
    from harness.run.sweep import run_sweep

    REGISTRY.names()  # load the built-ins first, then add the probe for this test only
    monkeypatch.setitem(REGISTRY._methods, PidMethod.name, PidMethod)
    monkeypatch.setitem(REGISTRY._sources, PidMethod.name, __name__)
    raw = {**tiny_raw(bits=["W8A8", "W4A4"]), "methods": ["pid-probe"]}
    summary = run_sweep(parse_config(raw), tmp_path, progress=False)
    assert len(summary.done) == 3 and not summary.failed
    pids = [json.loads((tmp_path / "runs" / f"{k}.json").read_text())["stats"].get("pid") for k in summary.done]
    probes = [p for p in pids if p is not None]
    assert len(probes) == 2 and len(set(probes)) == 2 and os.getpid() not in probes
