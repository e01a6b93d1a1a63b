"""The local executor: runs one after another, each in a fresh process of its own.

A fresh (spawned) process per run makes each run's peak memory its own: in one shared process the
sampled peak RSS grew with plan order (earlier runs' allocator pools and caches stay resident), so
"least memory" ranked run order. On CUDA the meter reads the allocator's own peak either way. The
price is a Python start and import per run (seconds) and tokenized data cached per process only.

A run whose method class cannot be pickled by reference (defined in a notebook's ``__main__``) runs
in the driver process instead, with a warning; so do tasks swapped in by tests, and every run with
``executor: {isolate: false}``.
"""
from __future__ import annotations

import logging
import multiprocessing
import pickle
from collections.abc import Hashable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from harness.engine.allocator import allocator_env
from harness.environ import environment
from harness.run.executors.base import Executor, Outcome, run_task
from harness.method import Method
from harness.quiet import quiet_requested, silence_progress
from harness.registry import REGISTRY
from harness.run.execute import RunSpec

log = logging.getLogger(__name__)


class _Deferred:
    """A run waiting its turn; local runs start only when the driver waits, so each is stored before the next."""

    def __init__(self, run: RunSpec) -> None:
        self.run = run


def isolated_task(run: RunSpec, method: type[Method], progress: bool, quiet: bool, log_level: int) -> Outcome:
    """What the run's own process executes: the parent's registrations, logging and quiet mode, then the run."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if quiet:
        silence_progress()
    if run.method not in REGISTRY.names():
        REGISTRY.register(method, source=method.__module__)  # registered at runtime in the parent (a test, a notebook)
    return run_task(run, progress)


class LocalExecutor(Executor):
    kind = "local"
    retries = False

    def submit(self, run: RunSpec) -> Hashable:
        return _Deferred(run)

    def wait(self, handles: list[Hashable]) -> list[tuple[Hashable, Outcome]]:
        handle = handles[0]
        log.info("run %s", handle.run.label)
        return [(handle, self._execute(handle.run))]

    def _execute(self, run: RunSpec) -> Outcome:
        args = (run, run.method_class, self.progress, quiet_requested(), logging.getLogger().getEffectiveLevel())
        if self.task is not run_task:
            return self.task(run, self.progress)
        if not self.config.isolate:
            return run_task(run, self.progress)
        try:
            pickle.dumps(args)
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            log.warning("run %s executes in the driver process (peak memory includes earlier runs%s): %s", run.label,
                        "; executor.host_allocator does not apply" if self.config.host_allocator != "default" else "", err)
            return run_task(run, self.progress)
        # the run's process starts inside this environment (executor.host_allocator)
        with environment(allocator_env(self.config.host_allocator)), \
                ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                return pool.submit(isolated_task, *args).result()
            except BrokenProcessPool as err:  # killed (out of memory, a signal): recorded under failed/
                return Outcome(error=f"the run's process died: {err}")


EXECUTOR = LocalExecutor
