"""The results store: one JSON file per run, written atomically, keyed by what decides the result.

Layout of a sweep's output directory::

    runs/<key>.json      finished runs (the report reads these)
    failed/<key>.json    the last error of runs that raised (retried on the next invocation)
    samples/<key>/<task>.jsonl   lm-eval's per-sample logs (evaluation.zeroshot.log_samples)
    config.yaml          the sweep config as last run

A run's key hashes model, method and options, bit spec, calibration, evaluation settings and
seed; re-running a sweep skips keys already in ``runs/`` so an interrupted sweep resumes where it
stopped and a finished one costs nothing. Writes go to a temporary file in the same directory and
are renamed into place, so a crash never leaves a truncated result or touches earlier ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.record import RecordError, RunRecord


def run_key(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results and reports are ordinary files
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


class ResultStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.failed = self.root / "failed"
        self.samples = self.root / "samples"

    def has(self, key: str) -> bool:
        return (self.runs / f"{key}.json").is_file()

    def write(self, key: str, record: RunRecord) -> Path:
        path = self.runs / f"{key}.json"
        for task, rows in record.samples.items():  # before the result, so a stored result has its samples
            lines = "".join(json.dumps(row, default=str) + "\n" for row in rows)
            write_text_atomic(self.samples / key / f"{task}.jsonl", lines)
        write_json_atomic(path, record.to_dict())
        (self.failed / f"{key}.json").unlink(missing_ok=True)
        return path

    def write_failure(self, key: str, record: dict) -> Path:
        path = self.failed / f"{key}.json"
        write_json_atomic(path, record)
        return path

    def read(self, path: Path) -> RunRecord:
        """One stored result, checked (``RecordError`` naming the file when it cannot be trusted)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RecordError(f"{path}: unreadable result ({err.__class__.__name__}: {err})") from None
        return RunRecord.from_dict(data, where=str(path))

    def records(self) -> Iterator[RunRecord]:
        for path in sorted(self.runs.glob("*.json")):
            yield self.read(path)

    def failures(self) -> Iterator[dict]:
        for path in sorted(self.failed.glob("*.json")):
            with path.open() as f:
                yield json.load(f)
