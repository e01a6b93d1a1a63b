"""A run's work directory (``<out>/work/<key>``: finished blocks and the engine's checkpoint), and its removal.

The work directory is what a killed run resumes from, so it goes only after the run's result is
stored (the sweep driver removes it, ``harness.run.sweep``), and it goes in one step as far as any
reader can tell: ``discard`` renames it to ``<out>/work/.trash-<key>-<pid>`` first, then deletes
that. A kill during the deletion leaves a ``.trash-*`` folder that no run ever reads, and
``clean_trash`` removes it when the next sweep on the folder starts. A work directory left beside a
stored result (a kill between the result write and the removal) is removed by the next sweep
without redoing the run.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from harness.runtime import kill_point

log = logging.getLogger(__name__)

TRASH_PREFIX = ".trash-"


def discard(work: Path) -> bool:
    """Remove the work directory ``work`` (rename aside, then delete); False when there was none."""
    work = Path(work)
    trash = work.parent / f"{TRASH_PREFIX}{work.name}-{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)  # this process's own leftover of the same key (rename needs the name free)
    try:
        os.replace(work, trash)
    except FileNotFoundError:
        return False
    # deleted in two halves, so that the test hook can stop a removal in its middle
    files = sorted(p for p in trash.rglob("*") if p.is_file())
    for path in files[: len(files) // 2]:
        path.unlink(missing_ok=True)
    kill_point("remove:mid")
    shutil.rmtree(trash, ignore_errors=True)
    return True


def clean_trash(root: Path) -> list[Path]:
    """Delete the ``.trash-*`` folders a killed removal left under ``root`` (``<out>/work``); return them."""
    root = Path(root)
    removed = []
    for trash in sorted(root.glob(f"{TRASH_PREFIX}*")) if root.is_dir() else ():
        shutil.rmtree(trash, ignore_errors=True)  # another sweep may be deleting it too: either finishes it
        log.info("removed %s (a work directory whose removal was interrupted)", trash)
        removed.append(trash)
    return removed
