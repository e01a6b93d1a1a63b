"""The Slurm executor: each run is a job submitted with submitit; the driver polls and stores results.

Each job asks for its run's resources (``executor.resources`` over ``executor.slurm``) and is named
``ptqbench-<model>-<method>-<bits>-s<seed>``; with ``max_concurrent`` the driver keeps at most that
many jobs queued or running and submits the next as one finishes. A job is requeued when it is
preempted or reaches its time limit (``RunJob.checkpoint``) and resumes from the run's block
checkpoints. Job scripts, submitit's logs and pickled results live in ``<out>/slurm/`` (named by
job id); ``jobs.json`` there maps each run key to its last job. A driver that was killed finds its
jobs again on restart: a job still queued or running is waited for, and a job that finished in the
meantime is collected from its pickle, so no finished run is redone. ``cluster: local`` uses
submitit's LocalExecutor (the same code path minus sbatch: jobs are local processes), which is how
the tests run it.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Hashable
from typing import Any

from harness.engine.allocator import allocator_env
from harness.environ import environment
from harness.errors import ResourceUnavailableError
from harness.run.executors.base import Executor, Outcome, Task, require
from harness.run.execute import RunSpec
from harness.atomic import write_json_atomic

log = logging.getLogger(__name__)


class RunJob:
    """What a job executes: ``task(run)``, checkpointable in submitit's sense (it has ``checkpoint``).

    On preemption, or when Slurm signals (USR2, 90 s ahead) that the time limit is near, submitit
    calls ``checkpoint`` and requeues the job with what it returns: the same run, unchanged. Same
    key and work directory, so the requeued job continues from the last finished block group
    (``harness.engine.checkpoint``); only the group in progress is redone. submitit requeues a job at
    most 3 times for its time limit (preemptions are not counted); after that the job fails and
    the driver's ``max_retries`` take over, which resume from the same checkpoints.
    """

    def __init__(self, task: Task, run: RunSpec) -> None:
        self.task = task
        self.run = run

    def __call__(self) -> Outcome:
        return self.task(self.run, False)  # bars in a job's stderr file would be noise; the run's log has progress lines

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission  # in the job, where submitit is installed

        log.warning("run %s: preempted or near its time limit; requeued, it resumes from its last finished block group",
                    self.run.label)
        return DelayedSubmission(RunJob(self.task, self.run))


class SlurmExecutor(Executor):
    kind = "slurm"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.submitit = require("submitit", "slurm")
        o = self.config.slurm
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if o.cluster == "slurm" and missing:
            raise ResourceUnavailableError(f"executor.slurm.cluster: 'slurm' but {' and '.join(missing)} not on PATH; "
                                           "run from a Slurm login node, or use cluster: local")
        self.folder = self.out_dir / "slurm"
        self._ex = self.submitit.AutoExecutor(folder=self.folder, cluster=o.cluster)
        self._jobs_file = self.folder / "jobs.json"
        self._jobs: dict[str, str] = json.loads(self._jobs_file.read_text()) if self._jobs_file.is_file() else {}
        self._seen: set[str] = set()  # runs this driver has submitted or re-attached once

    def auto_device(self) -> str | None:
        return "cuda" if self.config.slurm.gpus > 0 else "cpu"

    def max_in_flight(self) -> int | None:
        return self.config.slurm.max_concurrent

    def requested(self, run: RunSpec) -> dict[str, Any]:
        o, r = self.config.slurm, self.config.resources_for(run.model, run.bits.name)
        req = {"job_name": f"ptqbench-{run.slug}", "gpus": o.gpus if r.gpus is None else r.gpus, "cpus": r.cpus or o.cpus,
               "mem_gb": r.mem_gb or o.mem_gb, "time_min": r.time_min or o.time_min}
        if o.cluster == "slurm":
            req["partition"] = r.partition or o.partition
        return req

    def _parameters(self, run: RunSpec) -> dict[str, Any]:
        """submitit's parameters for ``run``'s job (set on the executor right before its submission)."""
        req = self.requested(run)
        params = dict(name=req["job_name"], timeout_min=req["time_min"], gpus_per_node=req["gpus"],
                      cpus_per_task=req["cpus"], mem_gb=req["mem_gb"])
        if self.config.slurm.cluster == "slurm":
            params.update(slurm_partition=req["partition"], slurm_additional_parameters=dict(self.config.slurm.extra) or None)
        return params

    def _previous_job(self, run: RunSpec) -> Any:
        """The job an earlier (killed) driver left for ``run``, if it is still useful."""
        job_id = self._jobs.get(run.key)
        if job_id is None:
            return None
        cls = self.submitit.SlurmJob if self.config.slurm.cluster == "slurm" else self.submitit.LocalJob
        job = cls(folder=self.folder, job_id=job_id)
        if not job.done():
            return job  # queued or running on the cluster
        try:
            outcome = job.result()
        except Exception:  # killed, timed out or never started: submit afresh
            return None
        return job if isinstance(outcome, Outcome) and outcome.record is not None else None

    def submit(self, run: RunSpec) -> Hashable:
        if run.key not in self._seen:
            self._seen.add(run.key)
            job = self._previous_job(run)
            if job is not None:
                log.info("slurm: run %s re-attached to job %s", run.label, job.job_id)
                return job
        try:
            self._ex.update_parameters(**self._parameters(run))
            with environment(allocator_env(self.config.host_allocator)):  # sbatch exports the submitter's environment
                job = self._ex.submit(RunJob(self.task, run))
        except Exception as err:  # sbatch refused (bad partition, account, limits): a setup problem, stop here
            lines = [line for line in str(err).splitlines() if line.strip()] or [err.__class__.__name__]
            detail = next((line for line in lines if "error" in line.lower()), lines[-1]).strip()
            raise ResourceUnavailableError(f"executor.slurm: submitting run {run.label} failed: {detail}") from None
        log.info("slurm: run %s submitted as job %s %s; log: %s", run.label, job.job_id, self.requested(run), run.log_file)
        self._jobs[run.key] = job.job_id
        write_json_atomic(self._jobs_file, self._jobs)
        return job

    def wait(self, handles: list[Hashable]) -> list[tuple[Hashable, Outcome]]:
        while True:
            finished = [job for job in handles if job.done()]
            if finished:
                break
            time.sleep(self.config.slurm.poll_s)
        results = []
        for job in finished:
            try:
                outcome = job.result()
            except Exception as err:  # the job died (time limit, node failure, out of memory)
                outcome = Outcome.from_exception(err)
            results.append((job, outcome))
        return results


EXECUTOR = SlurmExecutor
