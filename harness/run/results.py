"""The results store: one JSON file per run, written atomically, keyed by what decides the result.

Layout of a sweep's output directory::

    runs/<key>.json      finished runs (the report reads these)
    failed/<key>.json    the last error of runs that raised (retried on the next invocation)
    invalid/<name>.<time>.json  results that failed validation on resume, moved aside (the run is redone)
    locks/<key>.lock     per-run locks (flock), so two sweeps on one folder never run a key twice
    samples/<key>/<task>.jsonl   lm-eval's per-sample logs (evaluation.zeroshot.log_samples)
    quantized/<key>/     the quantized model of runs whose sweep says keep_quantized (export format)
    logs/<slug>-<key>.log        each run's own log, appended by its worker (harness.run.runlog)
    config.yaml          the sweep config as last run

A run's key hashes model, method and options, bit spec, calibration, evaluation settings and
seed; re-running a sweep skips keys already in ``runs/`` so an interrupted sweep resumes where it
stopped and a finished one costs nothing. Writes go to a temporary file in the same directory and
are renamed into place, so a crash never leaves a truncated result or touches earlier ones; a
killed writer's temporary file is removed by the next sweep (``clean_temp``). A stored result is
trusted only after it parses as a complete ``RunRecord`` of this schema whose key matches its file
name. Any failure to write (read-only folder, disk full) is a ``StorageError`` naming the file.
"""
from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.atomic import storage_error, write_json_atomic, write_text_atomic
from harness.run.record import RecordError, RunRecord

log = logging.getLogger(__name__)

STALE_TEMP_S = 60.0  # a temp file this old has no live writer (a write takes milliseconds)


def run_key(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``locks/<key>.lock``; the kernel drops it when its process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when this process now holds the lock; False when another process does."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise storage_error(err, "lock", self.path) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return False
            raise storage_error(err, "lock", self.path) from err
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())  # for the other process's log line only
        self.fd = fd
        return True

    def holder(self) -> str:
        """The pid written by the process holding the lock ('?' if it has not written it yet)."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (unlinking it would race a new holder)
            self.fd = None


class ResultStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.failed = self.root / "failed"
        self.samples = self.root / "samples"

    @property
    def invalid(self) -> Path:
        return self.root / "invalid"

    @property
    def quantized(self) -> Path:
        """``quantized/``: each run's quantized model in the export format, where the sweep says ``keep_quantized``."""
        return self.root / "quantized"

    def log_path(self, key: str, slug: str) -> Path:
        """A run's log file (``logs/<slug>-<key>.log``): the slug to find it by eye, the key to make it unique."""
        return self.root / "logs" / f"{slug}-{key}.log"

    def lock(self, key: str) -> RunLock:
        return RunLock(self.root / "locks" / f"{key}.lock")

    def has(self, key: str) -> bool:
        """Whether a trustworthy result of ``key`` is stored; an untrustworthy one is moved to invalid/ (and redone)."""
        path = self.runs / f"{key}.json"
        if not path.is_file():
            return False
        try:
            record = self.read(path)
            if record.key != key:
                raise RecordError(f"{path}: holds the result of key {record.key!r}, not {key!r}")
        except RecordError as err:
            self.set_aside(path, str(err))
            return False
        return True

    def set_aside(self, path: Path, reason: str) -> Path:
        """Move an invalid result to ``invalid/<name>.<UTC time>.json`` (kept for inspection, never read again)."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.invalid / f"{path.stem}.{stamp}.json"
        try:
            self.invalid.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        except OSError as err:
            raise storage_error(err, "invalid result", path) from err
        log.warning("invalid result %s moved to %s; the run will be redone (%s)", path, target, reason)
        return target

    def clean_temp(self, older_than_s: float = STALE_TEMP_S) -> list[Path]:
        """Delete temp files a killed writer left (``.*.tmp`` older than ``older_than_s``); return them."""
        now = time.time()
        removed = []
        for folder in (self.root, self.runs, self.failed):
            for path in folder.glob(".*.tmp") if folder.is_dir() else ():
                try:
                    if now - path.stat().st_mtime > older_than_s:
                        path.unlink()
                        removed.append(path)
                        log.warning("removed stale temporary file %s (left by an interrupted write)", path)
                except FileNotFoundError:
                    continue  # another sweep cleaned it first
                except OSError as err:
                    raise storage_error(err, "stale temporary file", path) from err
        return removed

    def write(self, key: str, record: RunRecord) -> Path:
        path = self.runs / f"{key}.json"
        for task, rows in record.samples.items():  # before the result, so a stored result has its samples
            lines = "".join(json.dumps(row, default=str) + "\n" for row in rows)
            write_text_atomic(self.samples / key / f"{task}.jsonl", lines, "zero-shot samples")
        write_json_atomic(path, record.to_dict(), "result")
        (self.failed / f"{key}.json").unlink(missing_ok=True)
        return path

    def write_failure(self, key: str, record: dict) -> Path:
        path = self.failed / f"{key}.json"
        write_json_atomic(path, record, "failure record")
        return path

    def read(self, path: Path) -> RunRecord:
        """One stored result, checked (``RecordError`` naming the file when it cannot be trusted)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RecordError(f"{path}: unreadable result ({err.__class__.__name__}: {err})") from None
        return RunRecord.from_dict(data, where=str(path))

    def records(self) -> Iterator[RunRecord]:
        """Every trustworthy result; a corrupt one is skipped with a warning naming its file."""
        for path in sorted(self.runs.glob("*.json")):
            try:
                yield self.read(path)
            except RecordError as err:
                log.warning("skipping %s", err)

    def failures(self) -> Iterator[dict]:
        for path in sorted(self.failed.glob("*.json")):
            with path.open() as f:
                yield json.load(f)
