"""What every executor shares: the task a worker runs, and the driver loop with retries.

An executor only knows how to start one attempt of a run (``submit``) and how to wait until some
attempt has finished (``wait``). ``Executor.run`` does the rest the same way everywhere: a progress
bar over runs, each result handed to the driver's callback as soon as it arrives (the driver
stores it atomically right then, so a killed driver loses no finished run), failures reported with
their error and retried up to ``max_retries`` times, then handed to the failure callback. An
executor may cap how many attempts are in flight at once (``max_in_flight``: Slurm's
``max_concurrent``) and say what each run asks for (``requested``: ``executor.resources``).
Wherever a run lands, ``run_task`` appends its log to the run's own file (``harness.run.runlog``).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import time
import traceback
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from tqdm.auto import tqdm

from harness.engine.memory import GB, estimate
from harness.errors import PtqbenchError, ResourceUnavailableError
from harness.progress import duration
from harness.run.execute import RunSpec, execute
from harness.run.executor_config import ExecutorConfig
from harness.run.provenance import provenance
from harness.run.record import RunRecord
from harness.run.runlog import run_log

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One finished attempt: a result record, or the error that stopped it."""

    record: RunRecord | None = None
    error: str | None = None
    traceback: str | None = None

    @classmethod
    def from_exception(cls, err: BaseException) -> Outcome:
        return cls(error=f"{err.__class__.__name__}: {err}".splitlines()[0],
                   traceback="".join(traceback.format_exception(err)))


def run_task(run: RunSpec, progress: bool = False) -> Outcome:
    """Execute one run where it lands (this process, a Ray worker, a Slurm job), logging to its log file.

    Errors are caught here and returned, so a backend only ever raises for lost workers or jobs.
    Provenance is taken here because the hardware that matters is the worker's.
    """
    with run_log(run.log_file) as file_only:
        job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")  # Slurm sets both
        where = (f", slurm job {job}" if job else "") + (f" (requeued {restarts}x)" if restarts != "0" else "")
        file_only.info("run %s (key %s) started on %s, pid %d%s", run.label, run.key, socket.gethostname(), os.getpid(), where)
        started = time.monotonic()
        try:
            record = execute(run, progress)
        except Exception as err:  # one failing run must not stop the sweep; the driver keeps the error on disk
            if not isinstance(err, PtqbenchError):
                log.debug("run %s:\n%s", run.label, traceback.format_exc())
            outcome = Outcome.from_exception(err)
            file_only.error("run %s failed after %s: %s\n%s", run.label, duration(time.monotonic() - started),
                            outcome.error, outcome.traceback)
            return outcome
        file_only.info("run %s finished in %s: %s", run.label, duration(time.monotonic() - started),
                       json.dumps(record.metrics.get("ppl", {})))
    record.provenance = {**provenance(), **record.provenance}  # execute's own (inputs, dtype) beside the worker's
    return Outcome(record=record)


Task = Callable[..., Outcome]
OnDone = Callable[[RunSpec, RunRecord], None]
OnFailed = Callable[[RunSpec, Outcome], None]


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ResourceUnavailableError(
            f"executor {extra}: the {module!r} package is not installed; pip install 'ptqbench[{extra}]'") from None


class Executor(ABC):
    kind: ClassVar[str]
    retries: ClassVar[bool] = True  # the local executor reruns nothing within a sweep

    def __init__(self, config: ExecutorConfig, out_dir: str | Path, *, progress: bool = True, task: Task = run_task) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.task = task  # tests swap in tasks that fail or kill their worker

    @abstractmethod
    def submit(self, run: RunSpec) -> Hashable:
        """Start one attempt of ``run``; returns a handle that ``wait`` reports back."""

    @abstractmethod
    def wait(self, handles: list[Hashable]) -> list[tuple[Hashable, Outcome]]:
        """Block until at least one of ``handles`` has finished; return the finished ones."""

    def requested(self, run: RunSpec) -> dict[str, Any]:
        """What ``run``'s task or job asks the cluster for (``executor.resources`` over the executor's defaults)."""
        return {}

    def max_in_flight(self) -> int | None:
        """At most this many attempts submitted and unfinished at once (None: every run at once)."""
        return None

    def provenance(self, run: RunSpec) -> dict[str, Any]:
        """Recorded with the run's result (not part of its key): the resources it asked for."""
        requested = self.requested(run)
        return {"resources": requested} if requested else {}

    def auto_device(self) -> str | None:
        """What ``device: auto`` means where the runs execute; None: each run decides in its own process."""
        return None

    def close(self) -> None:
        """Release what the executor started (a local Ray cluster)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, runs: list[RunSpec], on_done: OnDone, on_failed: OnFailed, desc: str = "sweep") -> None:
        """Run every run once (plus retries), calling back the moment each one settles.

        With ``max_in_flight``, runs wait here in plan order and each finished attempt frees a slot
        for the next (a retry goes first: its run was already started once).
        """
        max_retries = self.config.max_retries if self.retries else 0
        limit = self.max_in_flight()
        attempts = {run.key: 1 for run in runs}
        waiting = deque(runs)
        pending: dict[Hashable, RunSpec] = {}
        for run in runs:
            self._check_memory(run)
        with tqdm(total=len(runs), desc=f"{desc} ({self.kind})", unit="run", disable=not self.progress) as bar:
            while waiting or pending:
                while waiting and (limit is None or len(pending) < limit):
                    run = waiting.popleft()
                    pending[self.submit(run)] = run
                for handle, outcome in self.wait(list(pending)):
                    run = pending.pop(handle)
                    if outcome.record is not None:
                        on_done(run, outcome.record)
                    elif attempts[run.key] <= max_retries:
                        log.warning("run %s failed (attempt %d of %d), retrying: %s",
                                    run.label, attempts[run.key], max_retries + 1, outcome.error)
                        attempts[run.key] += 1
                        waiting.appendleft(run)
                        continue
                    else:
                        on_failed(run, outcome)
                    bar.update(1)
                    bar.set_postfix_str(run.label)

    def _check_memory(self, run: RunSpec) -> None:
        """Warn before submitting when a run asks for less host memory than its estimated peak (harness.engine.memory)."""
        mem_gb = self.requested(run).get("mem_gb")
        est = estimate(run) if mem_gb else None
        if est is not None and est.host_bytes > mem_gb * GB:
            log.warning("run %s asks for %g GB of host memory but its estimated peak is %.1f GB; "
                        "give its model more under executor.resources (mem_gb)", run.label, mem_gb, est.host_bytes / GB)
