"""Run a sweep: plan its runs, skip those already stored, hand the rest to an executor, store each result.

Each run to do is locked first (``locks/<key>.lock``), so a second sweep on the same folder skips
the runs this one holds and says so; a failure to write (read-only folder, disk full) stops the
sweep with a ``StorageError`` and leaves every stored result as it was. A run's work directory
(``<out>/work/<key>``, what a killed run resumes from) is removed only after its result is stored;
one left beside a stored result is removed without redoing the run (``harness.run.workdir``).

``run_sweep`` is the driver. The unit of work it hands out (``RunSpec``, ``execute``) lives in
``harness.run.execute``, so executors import that and this module imports the executors.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.run.executors import make_executor
from harness.run.executors.base import Executor, Outcome
from harness.run.config import SweepConfig
from harness.run.execute import RunSpec, plan
from harness.runtime import kill_point
from harness.run.preflight import check_device
from harness.run.record import RunRecord
from harness.run.results import ResultStore, RunLock
from harness.atomic import write_json_atomic, write_text_atomic
from harness.run.workdir import clean_trash, discard

log = logging.getLogger(__name__)


@dataclass
class SweepSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)  # key -> pid of the other process running it
    exported: list[str] = field(default_factory=list)
    export_failed: dict[str, str] = field(default_factory=dict)


def run_sweep(config: SweepConfig, out_dir: str | Path, *, force: bool = False, progress: bool = True,
              executor: Executor | None = None) -> SweepSummary:
    """Execute every planned run not already stored in ``out_dir`` (all of them with ``force``).

    ``config.executor`` decides where runs execute (``executor`` overrides it with a ready
    ``harness.run.executors`` instance); every result comes back here and is stored as it arrives.
    """
    check_device(config.device, config.executor.kind)
    store = ResultStore(out_dir)
    summary = SweepSummary()
    locks: list[RunLock] = []
    ex = executor or make_executor(config.executor, store.root, progress=progress)
    with ex:
        if config.device == "auto" and (device := ex.auto_device()):
            # A run's key names the device it executes on: a GPU worker's, not a CPU-only driver's.
            config = dataclasses.replace(config, device=device)
        runs = plan(config)
        store.clean_temp()
        write_json_atomic(store.root / "plan.json", [{"key": r.key, "label": r.label} for r in runs], "plan")
        write_text_atomic(store.root / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False), "config copy")
        # each run keeps its block checkpoints in <out>/work/<key> (resumed after a crash, deleted once its
        # result is stored), its worker appends its log to <out>/logs/<slug>-<key>.log, and keep_quantized
        # writes <out>/quantized/<key> (absolute paths: workers run elsewhere)
        work_root = store.root.resolve() / "work"
        clean_trash(work_root)
        try:
            todo = [dataclasses.replace(run, work_root=str(work_root), quantized_root=str(store.quantized.resolve()),
                                        log_file=str(store.log_path(run.key, run.slug).resolve()))
                    for run in _claim(runs, store, summary, locks, force, work_root)]
            _execute(todo, config, store, summary, ex)
        finally:
            for lock in locks:
                lock.release()
    if config.export:
        export_runs(runs, store, summary, progress=progress)
    return summary


def _claim(runs: list[RunSpec], store: ResultStore, summary: SweepSummary, locks: list[RunLock], force: bool,
           work_root: Path) -> list[RunSpec]:
    """The runs this sweep will execute, each locked; done ones and those another process holds are skipped.

    A done run's work directory, left by a kill between its result write and the removal, is removed here.
    """
    todo = []
    for run in runs:
        lock = store.lock(run.key)
        if not lock.acquire():
            pid = lock.holder()
            log.warning("skip %s: held by another process (pid %s)", run.label, pid)
            summary.held[run.key] = pid
            continue
        locks.append(lock)  # before anything that can raise, so the caller releases it
        # Checked under the lock: the other process may have finished this run a moment ago.
        if store.has(run.key) and not force:
            if not run.keep_work and discard(work_root / run.key):
                log.info("removed the work directory of %s, whose result is stored", run.label)
            lock.release()
            log.info("skip %s (done: runs/%s.json)", run.label, run.key)
            summary.skipped.append(run.key)
            continue
        todo.append(run)
    return todo


def _execute(todo: list[RunSpec], config: SweepConfig, store: ResultStore, summary: SweepSummary, ex: Executor) -> None:
    """Hand ``todo`` to the executor and store each result or failure the moment it settles."""
    def done(run: RunSpec, record: RunRecord) -> None:
        record.provenance = {**record.provenance, "argv": sys.argv, "config": config.to_dict(),
                             "seed": run.seed, "executor": ex.kind, **ex.provenance(run)}
        kill_point("result:before")
        store.write(run.key, record)
        kill_point("result:written")
        if not run.keep_work:  # only now: until the result is stored, a killed run resumes from it
            discard(Path(run.work_root) / run.key)
        summary.done.append(run.key)

    def failed(run: RunSpec, outcome: Outcome) -> None:
        log.error("run %s failed: %s (log: %s)", run.label, outcome.error, run.log_file)
        store.write_failure(run.key, {"key": run.key, "label": run.label, "error": outcome.error,
                                      "traceback": outcome.traceback, "run": run.identity()})
        summary.failed[run.key] = outcome.error or "failed"

    if todo:
        ex.run(todo, done, failed, desc=f"sweep {config.name}")


def export_runs(runs: list[RunSpec], store: ResultStore, summary: SweepSummary, *, progress: bool = True) -> None:
    """``export: true``: each stored quantized run not exported yet goes to <out>/export/<key>/ (the model the
    sweep kept, copied, or quantized again here)."""
    from harness.run.export_run import export_run, kept_model

    for run in runs:
        target = store.root / "export" / run.key
        if run.method_class.is_baseline or not store.has(run.key) or target.exists():
            continue
        try:
            result = export_run(store.read(store.runs / f"{run.key}.json"), target, progress=progress,
                                kept=kept_model(store.root, run.key))
        except Exception as err:  # an export that fails must not lose the sweep's results; say why and go on
            log.error("export of %s failed: %s", run.label, err)
            summary.export_failed[run.key] = f"{err.__class__.__name__}: {err}".splitlines()[0]
            continue
        log.info("exported %s to %s (%s, %d bytes)", run.label, target, result.format, result.size_bytes)
        summary.exported.append(run.key)


__all__ = ["SweepSummary", "run_sweep"]
