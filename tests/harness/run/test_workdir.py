"""Removing a run's work directory: renamed aside in one step, then deleted; leftovers cleaned at the next start."""
from __future__ import annotations

import os
import subprocess
import sys

from harness.runtime import KILL_ENV
from harness.run.workdir import clean_trash, discard


def work_tree(root, key="abc"):
    work = root / key
    (work / "blocks").mkdir(parents=True)
    (work / "engine").mkdir()
    for i in range(4):
        (work / "blocks" / f"block_{i:04d}.safetensors").write_bytes(b"x" * 100)
    (work / "engine" / "state.json").write_text("{}")
    return work


def test_discard_removes_the_folder_and_says_whether_there_was_one(tmp_path):
    work = work_tree(tmp_path)
    assert discard(work) is True
    assert not work.exists() and list(tmp_path.iterdir()) == []
    assert discard(work) is False  # nothing to remove: no error


def test_a_removal_killed_in_its_middle_leaves_only_trash_that_the_next_start_cleans(tmp_path):
    work = work_tree(tmp_path)
    env = {**os.environ, KILL_ENV: "remove:mid"}
    code = f"from harness.run.workdir import discard; discard(__import__('pathlib').Path({str(work)!r}))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert not work.exists()  # the run's own name is gone at once: nothing reads a half-deleted checkpoint
    (trash,) = tmp_path.glob(".trash-abc-*")
    left = [p for p in trash.rglob("*") if p.is_file()]
    assert 0 < len(left) < 5  # really in the middle: some files deleted, some not
    work_tree(tmp_path, "other")  # a live work directory beside it is not touched
    assert clean_trash(tmp_path) == [trash]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_clean_trash_of_a_missing_root_is_a_no_op(tmp_path):
    assert clean_trash(tmp_path / "nope") == []
