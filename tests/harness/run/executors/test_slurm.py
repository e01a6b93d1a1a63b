"""The Slurm executor through submitit's LocalExecutor: the same code path minus sbatch."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from harness.engine.allocator import TUNABLES, allocator_env
from harness.errors import ResourceUnavailableError
from harness.run.executors import make_executor
from harness.run.executors.base import run_task
from harness.run.executors.slurm import RunJob
from harness.run.config import parse_config
from harness.run.execute import plan
from harness.runtime import KILL_ENV, KILL_SIGNAL_ENV
from harness.run.sweep import run_sweep
from tests.harness.engine.test_checkpoint import sweep as checkpoint_sweep
from tests.harness.run.executors.conftest import stored, tiny_sweep

pytestmark = pytest.mark.slow  # real processes or whole sweeps: outside the inner loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[4]  # the repository (tests/harness/run/executors/)
BIG = "ptqbench-no-such-org/no-such-model"  # stands in for a 70B: passes validation offline, never loaded here


def test_jobs_store_results_skip_done_runs_and_are_collected_after_a_driver_death(tmp_path, local_reference):
    config = tiny_sweep(kind="slurm", slurm={"cluster": "local", "time_min": 10, "gpus": 0, "poll_s": 0.2},
                        host_allocator="compact")
    summary = run_sweep(config, tmp_path, progress=False)
    assert sorted(summary.done) == sorted(local_reference) and not summary.failed
    records = stored(tmp_path)
    for key, ref in local_reference.items():
        assert records[key]["metrics"]["ppl"]["brown"] == pytest.approx(ref["metrics"]["ppl"]["brown"], rel=1e-6)
        assert records[key]["provenance"]["executor"] == "slurm" and records[key]["key"] == key
        assert records[key]["provenance"]["allocator"][TUNABLES] == allocator_env("compact")[TUNABLES]  # the job's environment
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
    stand_in_slurm(tmp_path, monkeypatch, f'cp "$1" {tmp_path}/job.sh\necho "sbatch: error: invalid partition specified: gpu" >&2\nexit 1\n')
    config = tiny_sweep(kind="slurm", slurm={"partition": "gpu", "time_min": 30, "gpus": 2, "cpus": 4, "mem_gb": 16,
                                             "extra": {"account": "p1"}})
    with pytest.raises(ResourceUnavailableError, match="submitting run .* failed: sbatch: error: invalid partition"):
        run_sweep(config, tmp_path / "out", progress=False)
    script = (tmp_path / "job.sh").read_text()
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=2", "--cpus-per-task=4", "--mem=16GB", "--account=p1",
                 "--job-name=ptqbench-tiny-random-llama-fp-W16A16-s0"):  # the first run submitted: the baseline
        assert f"#SBATCH {line}\n" in script


def stand_in_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sbatch_body: str) -> None:
    """sbatch/srun stand-ins first on PATH (submitit only checks that srun exists)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", sbatch_body), ("srun", "exit 1\n")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_each_job_asks_for_its_runs_resources_and_is_named_after_it(tmp_path, monkeypatch):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    # accepts every job: keeps its script and answers like sbatch
    stand_in_slurm(tmp_path, monkeypatch, f'n=$(ls {scripts} | wc -l)\ncp "$1" {scripts}/$n.sh\necho "Submitted batch job $((100 + n))"\n')
    config = tiny_sweep(models=["tiny-random-llama", BIG], kind="slurm", slurm={"partition": "gpu", "max_concurrent": 3}, resources=[
        {"models": [BIG], "gpus": 2, "mem_gb": 256, "time_min": 2880},
        {"models": [BIG], "bits": ["W4A4"], "partition": "bigmem"}])
    ex = make_executor(config.executor, tmp_path / "out")
    assert ex.max_in_flight() == 3
    runs = plan(config)  # fp and rtn W4A4 for each model
    for run in runs:
        ex.submit(run)
    texts = [(scripts / f"{i}.sh").read_text() for i in range(len(runs))]
    expected = {("tiny-random-llama", "fp"): ("gpu", 1, 64, 1440), ("tiny-random-llama", "rtn"): ("gpu", 1, 64, 1440),
                (BIG, "fp"): ("gpu", 2, 256, 2880), (BIG, "rtn"): ("bigmem", 2, 256, 2880)}
    for run, text in zip(runs, texts):
        partition, gpus, mem, time_min = expected[run.model, run.method]
        for line in (f"--partition={partition}", f"--gpus-per-node={gpus}", f"--mem={mem}GB", f"--time={time_min}",
                     f"--job-name=ptqbench-{run.slug}"):
            assert f"#SBATCH {line}\n" in text, (run.label, line)
        assert ex.provenance(run)["resources"] == {"job_name": f"ptqbench-{run.slug}", "gpus": gpus, "cpus": 8,
                                                   "mem_gb": mem, "time_min": time_min, "partition": partition}
    assert runs[3].slug == "no-such-model-rtn-W4A4-s0"  # a hub id's last part, a name sbatch accepts
    assert json.loads((tmp_path / "out" / "slurm" / "jobs.json").read_text()) == {r.key: str(100 + i) for i, r in enumerate(runs)}


def test_the_job_is_checkpointable_and_its_checkpoint_resubmits_the_same_run(tmp_path):
    from submitit.helpers import DelayedSubmission

    run = dataclasses.replace(plan(tiny_sweep())[1], work_root=str(tmp_path / "work"), log_file=str(tmp_path / "x.log"))
    job = RunJob(run_task, run)
    again = job.checkpoint()  # what submitit calls on USR2 (preemption, time limit) before requeueing
    assert isinstance(again, DelayedSubmission) and not again.args and not again.kwargs
    again.dump(tmp_path / "requeued.pkl")  # submitit pickles it for the requeued job
    loaded = DelayedSubmission.load(tmp_path / "requeued.pkl").function
    assert isinstance(loaded, RunJob) and hasattr(loaded, "checkpoint") and loaded.task is run_task
    assert loaded.run == run and loaded.run.key == run.key  # same key and work directory: the engine resumes there


def test_a_preempted_job_is_requeued_and_resumes_from_its_block_checkpoint(lazy_folder, tmp_path, monkeypatch):
    """A real OmniQuant job gets Slurm's preemption signal (USR2) right after checkpointing blocks 0-1:
    submitit requeues it (same job), the job runs the same run again and continues at block 2."""
    raw = yaml.safe_load(checkpoint_sweep(tmp_path, lazy_folder, {"name": "omniquant", "epochs": 1}).read_text())
    raw["executor"] = {"kind": "slurm", "max_retries": 0, "slurm": {"cluster": "local", "time_min": 10, "gpus": 0, "poll_s": 0.2}}
    config = parse_config(raw)
    monkeypatch.setenv(KILL_ENV, "block:1")
    monkeypatch.setenv(KILL_SIGNAL_ENV, "SIGUSR2")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the job's process unpickles harness functions by reference
    summary = run_sweep(config, tmp_path / "out", progress=False)
    assert len(summary.done) == 2 and not summary.failed  # fp and omniquant
    (key,) = [r.key for r in plan(config) if r.method == "omniquant"]
    (log_file,) = (tmp_path / "out" / "logs").glob(f"*-{key}.log")
    text = log_file.read_text()
    assert text.count(f"(key {key}) started on") == 2  # the requeued attempt appends to the same file
    first, second = text.split("requeued, it resumes from its last finished block group")
    assert "sending SIGUSR2" in first and "resuming from the checkpoint: blocks 0-1 are done" in second
    assert "omniquant: 4/4 group (100%)" in second and "finished in" in second
    jobs = json.loads((tmp_path / "out" / "slurm" / "jobs.json").read_text())
    assert len(jobs) == 2  # one job per run: requeued, never submitted again
    assert not (tmp_path / "out" / "work" / key).exists()  # finished: its checkpoints are gone
