"""A run's own log file: everything its worker logs while it runs, for ``tail -f`` on a long job.

The driver names the file (``RunSpec.log_file``: ``<out>/logs/<model>-<method>-<bits>-s<seed>-<key>.log``,
``harness.run.results.ResultStore.log_path``); ``harness.run.executors.base.run_task`` holds it open while
the run executes, wherever that is (a local run's process, a Ray worker, a Slurm job). It gets the
run's INFO log: loading, the memory estimate, progress lines (``harness.progress``), block
checkpoints, and a last line with the result or the traceback. The file is appended to, never
truncated, so a retried or requeued attempt continues it below the earlier one's lines.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The logger for lines meant for the file only (start, end, traceback): the driver reports the same
# events on its own terminal. Configured by run_log, not on import.
FILE_ONLY = "ptqbench.run"


@contextlib.contextmanager
def run_log(path: str | Path | None) -> Iterator[logging.Logger]:
    """While active, this process's INFO (and louder) records also go to ``path``; yields the logger for file-only lines.

    The process's other handlers keep the level they had (``ptqbench -q`` keeps a quiet terminal
    while the file still gets INFO): the root logger is opened to INFO and each existing handler is
    raised to the root's previous level for the duration.
    """
    file_only = logging.getLogger(FILE_ONLY)
    file_only.propagate = False
    file_only.setLevel(logging.INFO)
    if not file_only.handlers:
        file_only.addHandler(logging.NullHandler())  # no file attached: drop them (not Python's last-resort stderr)
    if path is None:
        yield file_only
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    previous = root.level
    raised: dict[logging.Handler, int] = {}
    if root.getEffectiveLevel() > logging.INFO:
        for other in root.handlers:
            if other.level < previous:
                raised[other] = other.level
                other.setLevel(previous)
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    file_only.addHandler(handler)
    try:
        yield file_only
    finally:
        file_only.removeHandler(handler)
        root.removeHandler(handler)
        root.setLevel(previous)
        for other, level in raised.items():
            other.setLevel(level)
        handler.close()
