"""The local executor: runs one after another in the driver process (token streams cached by ``harness.data``)."""
from __future__ import annotations

import logging
from collections.abc import Hashable

from harness.executors.base import Executor, Outcome
from harness.execute import RunSpec

log = logging.getLogger(__name__)


class _Deferred:
    """A run waiting its turn; local runs start only when the driver waits, so each is stored before the next."""

    def __init__(self, run: RunSpec) -> None:
        self.run = run


class LocalExecutor(Executor):
    kind = "local"
    retries = False

    def submit(self, run: RunSpec) -> Hashable:
        return _Deferred(run)

    def wait(self, handles: list[Hashable]) -> list[tuple[Hashable, Outcome]]:
        handle = handles[0]
        log.info("run %s", handle.run.label)
        return [(handle, self.task(handle.run, self.progress))]


EXECUTOR = LocalExecutor
