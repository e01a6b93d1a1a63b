"""The Slurm executor through submitit's LocalExecutor: the same code path minus sbatch."""
from __future__ import annotations

import json
import os

import pytest

from harness.errors import ResourceUnavailableError
from harness.executors import make_executor
from harness.sweep import run_sweep
from tests.harness.executors.conftest import stored, tiny_sweep


def test_jobs_store_results_skip_done_runs_and_are_collected_after_a_driver_death(tmp_path, local_reference):
    config = tiny_sweep(kind="slurm", slurm={"cluster": "local", "time_min": 10, "gpus": 0, "poll_s": 0.2})
    summary = run_sweep(config, tmp_path, progress=False)
    assert sorted(summary.done) == sorted(local_reference) and not summary.failed
    records = stored(tmp_path)
    for key, ref in local_reference.items():
        assert records[key]["metrics"]["ppl"]["brown"] == pytest.approx(ref["metrics"]["ppl"]["brown"], rel=1e-6)
        assert records[key]["provenance"]["executor"] == "slurm" and records[key]["key"] == key
    jobs = json.loads((tmp_path / "slurm" / "jobs.json").read_text())
    assert sorted(jobs) == sorted(local_reference)

    again = run_sweep(config, tmp_path, progress=False)  # everything stored: nothing is submitted
    assert sorted(again.skipped) == sorted(local_reference) and not again.done
    assert json.loads((tmp_path / "slurm" / "jobs.json").read_text()) == jobs

    # A driver killed after a job finished but before storing its result: the restart collects the
    # job's pickled result instead of submitting the run again.
    lost = sorted(jobs)[0]
    (tmp_path / "runs" / f"{lost}.json").unlink()
    resumed = run_sweep(config, tmp_path, progress=False)
    assert resumed.done == [lost]
    assert json.loads((tmp_path / "slurm" / "jobs.json").read_text()) == jobs  # no new job
    assert stored(tmp_path)[lost]["started_at"] == records[lost]["started_at"]  # not recomputed


def test_auto_device_follows_the_gpus_a_job_asks_for(tmp_path):
    for gpus, device in ((0, "cpu"), (1, "cuda")):
        assert make_executor(tiny_sweep(kind="slurm", slurm={"cluster": "local", "gpus": gpus}).executor, tmp_path).auto_device() == device


def test_slurm_cluster_without_sbatch_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ResourceUnavailableError, match="sbatch and srun not on PATH.*cluster: local"):
        make_executor(tiny_sweep(kind="slurm").executor, tmp_path)


def test_sbatch_gets_the_options_and_a_refusal_is_one_clear_error(tmp_path, monkeypatch):
    """A stand-in sbatch keeps the job script it was given and refuses it the way Slurm does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/job.sh\necho "sbatch: error: invalid partition specified: gpu" >&2\nexit 1\n')
    sbatch.chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that it exists
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    config = tiny_sweep(kind="slurm", slurm={"partition": "gpu", "time_min": 30, "gpus": 2, "cpus": 4, "mem_gb": 16,
                                             "extra": {"account": "p1"}})
    with pytest.raises(ResourceUnavailableError, match="submitting run .* failed: sbatch: error: invalid partition"):
        run_sweep(config, tmp_path / "out", progress=False)
    script = (tmp_path / "job.sh").read_text()
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=2", "--cpus-per-task=4", "--mem=16GB", "--account=p1"):
        assert f"#SBATCH {line}\n" in script
