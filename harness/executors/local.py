"""The local executor: runs one after another in the driver process, sharing tokenized data."""
from __future__ import annotations

import logging
from collections.abc import Hashable

from harness.executors.base import Executor, Outcome
from harness.runner import DataCache, RunSpec

log = logging.getLogger(__name__)


class _Deferred:
    """A run waiting its turn; local runs start only when the driver waits, so each is stored before the next."""

    def __init__(self, run: RunSpec) -> None:
        self.run = run


class LocalExecutor(Executor):
    kind = "local"
    retries = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache = DataCache()  # tokenizing a corpus once per sweep, not per run

    def submit(self, run: RunSpec) -> Hashable:
        return _Deferred(run)

    def wait(self, handles: list[Hashable]) -> list[tuple[Hashable, Outcome]]:
        handle = handles[0]
        log.info("run %s", handle.run.label)
        return [(handle, self.task(handle.run, self.progress, self.cache))]


EXECUTOR = LocalExecutor
