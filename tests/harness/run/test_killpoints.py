"""A real, lazy, checkpointed ``ptqbench run`` killed with SIGKILL at each named kill point
(``harness.runtime``), then the same command again: the resumed sweep succeeds with the
uninterrupted run's perplexity, no result file is ever partial, and a stored result is never redone.

Each killed sweep starts with the FP baseline's result already stored (copied from the reference
sweep), so the one run it executes, and the one the kill point hits, is the OmniQuant run.
"""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tests.harness.engine.test_checkpoint import result, run, sweep

pytestmark = pytest.mark.slow  # real processes or whole sweeps: outside the inner loop (-m "not slow")

METHOD = {"name": "omniquant", "epochs": 1}


@pytest.fixture(scope="module")
def reference(lazy_folder, tmp_path_factory) -> tuple[Path, Path]:
    """(config, out) of the uninterrupted sweep."""
    tmp = tmp_path_factory.mktemp("reference")
    config = sweep(tmp, lazy_folder, METHOD)
    done = run(config, tmp / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    return config, tmp / "out"


def killed_sweep(reference: tuple[Path, Path], out: Path, point: str, method: str = METHOD["name"]) -> str:
    """Run the sweep into ``out`` (FP already stored) and kill it at ``point``; return the method's run key."""
    config, ref_out = reference
    fp = next(p for p in (ref_out / "runs").glob("*.json") if json.loads(p.read_text())["method"] == "fp")
    (out / "runs").mkdir(parents=True)
    shutil.copy(fp, out / "runs" / fp.name)
    killed = run(config, out, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert f"PTQBENCH_TEST_KILL_AT={point}: sending SIGKILL" in killed.stderr
    for path in (out / "runs").glob("*.json"):  # a result file is complete or absent, never partial
        assert {"key", "metrics", "provenance"} <= set(json.loads(path.read_text()))
    return result(ref_out, method)["key"]


@pytest.mark.parametrize("point", ["block:0", "eval:mid", "eval:done", "result:before"])
def test_a_run_killed_before_its_result_is_stored_resumes_from_its_checkpoint(reference, tmp_path, point):
    out = tmp_path / "out"
    key = killed_sweep(reference, out, point)
    assert not (out / "runs" / f"{key}.json").exists()
    assert (out / "work" / key / "engine" / "state.json").is_file()

    resumed = run(reference[0], out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = "0-0" if point == "block:0" else "0-3"  # the kill after evaluation left every block checkpointed
    assert f"resuming from the checkpoint: blocks {done} are done" in resumed.stderr
    assert result(out, METHOD["name"])["metrics"] == result(reference[1], METHOD["name"])["metrics"]
    assert not (out / "work" / key).exists()


@pytest.mark.parametrize("point", ["result:written", "remove:mid"])
def test_a_run_killed_after_its_result_is_stored_is_never_redone(reference, tmp_path, point):
    out = tmp_path / "out"
    key = killed_sweep(reference, out, point)
    stored = (out / "runs" / f"{key}.json").read_bytes()
    assert json.loads(stored)["metrics"] == result(reference[1], METHOD["name"])["metrics"]
    if point == "result:written":  # the stale work directory of a finished run
        assert (out / "work" / key / "engine" / "state.json").is_file()
    else:  # renamed aside in one step, half deleted: no reader ever sees a half-deleted work directory
        assert not (out / "work" / key).exists() and list((out / "work").glob(f".trash-{key}-*"))

    again = run(reference[0], out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"(done: runs/{key}.json)" in again.stderr
    assert "omniquant: " not in again.stderr  # not quantized again
    assert (out / "runs" / f"{key}.json").read_bytes() == stored
    assert not (out / "work" / key).exists() and not list((out / "work").glob(".trash-*"))


def test_a_checkpoint_with_missing_block_files_restarts_cleanly(reference, tmp_path):
    """The manifest names four finished blocks, two of their files are gone (what a removal killed in its
    middle used to leave): one line says which and why, and the run starts over with the right result."""
    out = tmp_path / "out"
    key = killed_sweep(reference, out, "eval:done")
    blocks = out / "work" / key / "blocks"
    (blocks / "block_0001.safetensors").unlink()
    (blocks / "block_0002.structure.pt").unlink()

    resumed = run(reference[0], out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not used: block 1: blocks/block_0001.safetensors is missing; the run starts from block 0" in resumed.stderr
    assert "Traceback" not in resumed.stderr and "resuming from the checkpoint" not in resumed.stderr
    assert result(out, METHOD["name"])["metrics"] == result(reference[1], METHOD["name"])["metrics"]


def test_a_qllm_run_killed_after_its_evaluation_resumes_with_its_final_norm_state(lazy_folder, tmp_path):
    """The reported case: QLLM (blocks in pairs, its final-norm state in the checkpoint) killed after evaluating."""
    method = {"name": "qllm", "epochs": 1, "grid_steps": 4, "blocks_per_job": 2}
    config = sweep(tmp_path, lazy_folder, method)
    reference = run(config, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "out"
    key = killed_sweep((config, tmp_path / "reference"), out, "eval:done", "qllm")
    assert json.loads((out / "work" / key / "engine" / "state.json").read_text())["next_start"] == 4

    resumed = run(config, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from the checkpoint: blocks 0-3 are done" in resumed.stderr
    a, b = result(tmp_path / "reference", "qllm"), result(out, "qllm")
    assert a["metrics"] == b["metrics"] and a["stats"]["final_norm_loss"] == b["stats"]["final_norm_loss"]
