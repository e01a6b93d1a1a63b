"""Atomic file writes: a temporary file in the same directory, fsynced, then renamed into place.

Readers see the old file or the new one, never half of one; a failed write (read-only folder, disk
full) is a ``StorageError`` naming the file. Results, reports, token caches and exports all write
through here.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from harness.errors import StorageError


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def storage_error(err: OSError, what: str, path: Path) -> StorageError:
    """One line for a failed write: what, where, and the system's reason (``No space left on device``)."""
    reason = err.strerror or str(err)
    return StorageError(f"{what} {str(path)!r}: could not write ({reason}); nothing was half-written")


def write_text_atomic(path: Path, text: str, what: str = "file") -> None:
    """Write via a temporary file in the same directory and rename: readers see old or new, never half.

    An ``OSError`` (read-only folder, disk full) becomes a ``StorageError`` naming ``what`` and ``path``.
    """
    write_bytes_atomic(path, text.encode(), what)


def write_bytes_atomic(path: Path, data: bytes, what: str = "file") -> None:
    """``write_text_atomic`` for binary files (Parquet)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results and reports are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise storage_error(err, what, path) from err
        raise


def write_json_atomic(path: Path, data: Any, what: str = "file") -> None:
    """JSON as the standard allows it: a NaN or inf raises ``ValueError`` instead of writing ``NaN``."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str, allow_nan=False) + "\n", what)
