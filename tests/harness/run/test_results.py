from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time

import pytest

from harness.errors import StorageError
from harness.run.results import ResultStore, run_key
from harness.atomic import write_json_atomic, write_text_atomic
from tests.harness.records import record


def test_key_is_order_independent_and_sensitive():
    assert run_key({"a": 1, "b": [1, 2]}) == run_key({"b": [1, 2], "a": 1})
    assert run_key({"a": 1}) != run_key({"a": 2})


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_atomic_write_never_leaves_partial_files(tmp_path, monkeypatch, fails):
    """A crash inside the write (after the temp file holds the new text) keeps the old file and no temp."""
    import harness.run.results as results

    path = tmp_path / "r.json"
    write_json_atomic(path, {"x": 1})
    before = path.read_bytes()
    called = []

    def boom(*args):
        called.append(args)
        raise OSError("disk full")

    monkeypatch.setattr(results.os, fails, boom)
    with pytest.raises(StorageError, match="could not write \\(disk full\\)"):  # one line: what, where, why
        write_json_atomic(path, {"x": 2, "y": "a new result"})
    monkeypatch.undo()
    assert called  # the failure happened inside the write, not before it
    assert path.read_bytes() == before  # the old result survives byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no .r.json.*.tmp left behind
    write_json_atomic(path, {"x": 2})  # and the store still writes afterwards
    assert json.loads(path.read_text()) == {"x": 2}


def test_store_success_clears_failure(tmp_path):
    store = ResultStore(tmp_path)
    store.write_failure("k", {"error": "x"})
    assert list(store.failures())
    rec = record("m", "rtn", "W4A4", ppl={"brown": 3.0})
    store.write_failure(rec.key, {"error": "x"})
    store.write(rec.key, rec)
    assert store.has(rec.key) and list(store.failures()) == [{"error": "x"}]  # only its own failure is cleared
    assert list(store.records()) == [rec]


def test_atomic_files_get_ordinary_permissions(tmp_path):
    import os

    path = tmp_path / "r.json"
    write_json_atomic(path, {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_nan_is_never_written_as_json(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"ppl": 1.0})
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError):
            write_json_atomic(path, {"ppl": bad})
    assert json.loads(path.read_text()) == {"ppl": 1.0} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("content", ["", "{}", '{"key": "x", "schema_version": 2', "[1, 2]", "OTHER_KEY"], ids=["empty", "empty-object", "truncated", "list", "other-key"])
def test_resume_sets_an_untrustworthy_result_aside(tmp_path, caplog, content):
    store = ResultStore(tmp_path)
    good = record("m", "rtn", "W4A4", ppl={"brown": 3.0})
    store.write(good.key, good)
    other = record("m", "rtn", "W8A8", ppl={"brown": 2.0})
    bad = store.runs / "0123456789abcdef.json"
    if content == "OTHER_KEY":  # a complete record stored under the wrong name (a copy, a rename)
        content = json.dumps(other.to_dict())
    bad.write_text(content)
    with caplog.at_level(logging.WARNING, logger="harness.run.results"):
        assert not store.has("0123456789abcdef")
    [moved] = store.invalid.glob("0123456789abcdef.*.json")
    assert moved.read_text() == content and not bad.exists()
    assert any(str(bad) in r.getMessage() and str(moved) in r.getMessage() for r in caplog.records)
    assert store.has(good.key)  # the trustworthy one stays


def test_records_skip_a_corrupt_file_with_a_warning_naming_it(tmp_path, caplog):
    store = ResultStore(tmp_path)
    good = record("m", "rtn", "W4A4", ppl={"brown": 3.0})
    store.write(good.key, good)
    (store.runs / "bad.json").write_text('{"truncated": ')
    with caplog.at_level(logging.WARNING, logger="harness.run.results"):
        assert list(store.records()) == [good]
    assert any("bad.json" in r.getMessage() for r in caplog.records)


def test_clean_temp_removes_only_old_temp_files(tmp_path):
    store = ResultStore(tmp_path)
    store.runs.mkdir()
    old, fresh, result = store.runs / ".a.json.x1.tmp", tmp_path / ".plan.json.x2.tmp", store.runs / "a.json"
    for p in (old, fresh, result):
        p.write_text("x")
    past = time.time() - 120
    os.utime(old, (past, past))
    assert store.clean_temp() == [old]
    assert not old.exists() and fresh.exists() and result.exists()


def test_a_write_that_fails_is_one_storage_error_naming_the_file(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "r.json"
    write_text_atomic(path, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match=r"^result '.*r\.json': could not write \(No space left on device\)"):
        write_text_atomic(path, "new", "result")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_lock_is_exclusive_across_processes_and_names_its_holder(tmp_path):
    store = ResultStore(tmp_path)
    lock = store.lock("k")
    assert lock.acquire()
    probe = ("import sys; from harness.run.results import ResultStore; "
             "l = ResultStore(sys.argv[1]).lock('k'); print(l.acquire(), l.holder())")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    held = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, env=env, check=True)
    assert held.stdout.split() == ["False", str(os.getpid())]
    lock.release()
    free = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, env=env, check=True)
    assert free.stdout.split()[0] == "True"
