"""Injected faults on tiny sweeps: kill -9 during a run and during a result write, disk full, two
concurrent sweeps, a NaN metric, a changed data file. In every one, earlier results stay byte-identical.

Sweeps are the tiny random LLaMA scored on a small local text (seqlen 32, 2 windows): fp and rtn W8A8.
Killed and concurrent sweeps are real ``python -m``-style subprocesses (``tests/harness/run/fault_cli.py``
injects the pause); the rest run in-process through Click's runner.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from harness.cli import main

HELPER = Path(__file__).with_name("fault_cli.py")
TEXT = ("Results you can trust are stored once, checked on resume and never overwritten by a second sweep. " * 40 + "\n") * 3


def base(text: Path) -> dict:
    # in the driver process: the fault helper's pauses and kills must hit the run itself
    return {"name": "faults", "models": ["tiny-random-llama"], "methods": ["rtn"], "bits": ["W8A8"],
            "executor": {"isolate": False},
            "evaluation": {"ppl": {"datasets": [str(text)], "seqlen": 32, "max_windows": 2}}}


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    return result.exit_code, result.output


def results(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "runs").glob("*.json"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(data text, results folder of a finished sweep); tests copy the folder before changing anything."""
    tmp = tmp_path_factory.mktemp("faults")
    text = tmp / "text.txt"
    text.write_text(TEXT)
    out = tmp / "out"
    code, output = cli("run", str(write_config(tmp / "ok.yaml", base(text))), "--out", str(out))
    assert code == 0 and "2 run, 0 already done" in output, output
    return text, out


@pytest.fixture
def copy(finished, tmp_path) -> tuple[Path, Path, dict[str, bytes]]:
    """A private copy of the finished sweep, a config adding one run (W4A4), and the results before any fault."""
    text, out = finished
    mine = tmp_path / "out"
    shutil.copytree(out, mine)
    config = write_config(tmp_path / "more.yaml", {**base(text), "bits": ["W8A8", "W4A4"]})
    return config, mine, results(mine)


def start(fault: str, marker: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    return subprocess.Popen([sys.executable, str(HELPER), fault, str(marker), *args, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()}")
        assert time.time() < deadline, "the subprocess never reached the fault"
        time.sleep(0.1)


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_kill_during_a_run_loses_nothing_and_a_rerun_finishes(copy, tmp_path):
    config, out, before = copy
    proc = start("block-run", tmp_path / "in-run", "run", str(config), "--out", str(out))
    wait_for(tmp_path / "in-run", proc)
    kill9(proc)
    assert results(out) == before and not list(out.rglob(".*.tmp"))
    code, output = cli("run", str(config), "--out", str(out))  # the dead process's lock died with it
    assert code == 0 and "1 run, 2 already done" in output, output
    after = results(out)
    assert len(after) == 3 and {k: after[k] for k in before} == before


def test_kill_during_a_result_write_leaves_only_a_temp_file_that_the_next_sweep_removes(copy, tmp_path, caplog):
    config, out, before = copy
    proc = start("block-write", tmp_path / "in-write", "run", str(config), "--out", str(out))
    wait_for(tmp_path / "in-write", proc)
    kill9(proc)
    [tmp] = (out / "runs").glob(".*.tmp")  # written and synced, never renamed
    assert json.loads(tmp.read_text())["bits"] == "W4A4"
    assert results(out) == before
    old = time.time() - 120
    os.utime(tmp, (old, old))  # a minute later: no live writer can own it
    code, output = cli("run", str(config), "--out", str(out))
    assert code == 0 and "1 run, 2 already done" in output, output
    assert not tmp.exists() and not list(out.rglob(".*.tmp"))
    assert any(str(tmp) in r.getMessage() and "stale temporary file" in r.getMessage() for r in caplog.records)
    after = results(out)
    assert {k: after[k] for k in before} == before


def _full_disk_under(monkeypatch, folder: str | None) -> None:
    """fsync fails with ENOSPC for files in ``folder`` (any file when None), as on a full disk."""
    real = os.fsync

    def fsync(fd: int) -> None:
        where = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if folder is None or where.parent.name == folder:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_while_writing_a_result_stops_cleanly(copy, monkeypatch):
    config, out, before = copy
    _full_disk_under(monkeypatch, "runs")
    code, output = cli("run", str(config), "--out", str(out))
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, output
    assert lines[0].startswith("Error: result '") and str(out / "runs") in lines[0] and "No space left on device" in lines[0]
    assert results(out) == before and not list(out.rglob(".*.tmp")) and not list((out / "failed").glob("*.json"))
    monkeypatch.undo()
    code, output = cli("run", str(config), "--out", str(out))  # space again: the run is done, nothing else
    assert code == 0 and "1 run, 2 already done" in output, output


def test_report_onto_a_full_disk_is_one_line(finished, tmp_path, monkeypatch):
    _, out = finished
    _full_disk_under(monkeypatch, None)
    target = tmp_path / "rep.md"
    result = CliRunner().invoke(main, ["report", str(out), "-o", str(target)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: report '{target}': could not write (No space left on device)")
    assert not target.exists() and not list(tmp_path.glob(".*.tmp"))


def test_two_sweeps_on_one_folder_run_each_key_once(finished, tmp_path, caplog):
    text, _ = finished
    out = tmp_path / "out"
    config = write_config(tmp_path / "ok.yaml", base(text))
    first = start("block-run", tmp_path / "first", "run", str(config), "--out", str(out))
    wait_for(tmp_path / "first", first)  # the first sweep holds its runs and is inside one
    code, output = cli("run", str(config), "--out", str(out))
    assert code == 0 and "0 run, 0 already done, 2 held by another process" in output, output
    held = [r.getMessage() for r in caplog.records if "held by another process" in r.getMessage()]
    assert len(held) == 2 and all(f"(pid {first.pid})" in m for m in held)
    (tmp_path / "first.go").touch()
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0 and "2 run, 0 already done" in stdout, stderr
    # Every execution logs "run <label>" (harness.run.executors.local): two runs, each executed once.
    executed = [line for line in stderr.splitlines() if "harness.run.executors.local: run " in line]
    assert len(executed) == 2, stderr
    code, output = cli("run", str(config), "--out", str(out))
    assert code == 0 and "0 run, 2 already done" in output, output


def test_a_nan_metric_is_a_failure_not_a_result(finished, tmp_path):
    from transformers import AutoTokenizer

    from harness.models import ZOO, gguf_folder, tiny_llama

    text, _ = finished
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    folder = tmp_path / "inf-model"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_folder("smollm2-135m", ZOO["smollm2-135m"])).save_pretrained(folder)
    out = tmp_path / "out"
    config = write_config(tmp_path / "inf.yaml", {**base(text), "models": [str(folder)]})
    code, output = cli("run", str(config), "--out", str(out))
    assert code == 1 and "0 run, 0 already done, 2 failed" in output, output
    assert not list((out / "runs").glob("*.json"))
    failures = [json.loads(p.read_text()) for p in (out / "failed").glob("*.json")]
    assert len(failures) == 2
    for f in failures:
        assert f["error"].startswith("NonFiniteMetricError: metric ppl on dataset") and str(text) in f["error"]
    report = CliRunner().invoke(main, ["report", str(out)])
    assert report.exit_code == 0 and "No finished runs" in report.output and "2 failed run(s)" in report.output


def test_a_changed_data_file_is_a_new_run(finished, tmp_path):
    text, _ = finished
    data = tmp_path / "text.txt"
    shutil.copy(text, data)
    out = tmp_path / "out"
    config = write_config(tmp_path / "ok.yaml", base(data))
    assert cli("run", str(config), "--out", str(out))[0] == 0
    before = results(out)
    code, output = cli("run", str(config), "--out", str(out))
    assert code == 0 and "0 run, 2 already done" in output
    data.write_text(TEXT.replace("trust", "doubt"))  # same length, new content
    code, output = cli("run", str(config), "--out", str(out))
    assert code == 0 and "2 run, 0 already done" in output, output
    after = results(out)
    assert len(after) == 4 and {k: after[k] for k in before} == before
    digest = "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()
    fresh = [json.loads(v) for k, v in after.items() if k not in before]
    assert all(r["provenance"]["inputs"] == {str(data): digest} for r in fresh)
    assert all(r["provenance"]["dtype"] == "float32" and r["provenance"]["code_version"] for r in fresh)
