from __future__ import annotations

import json

import pytest

from harness.results import ResultStore, run_key, write_json_atomic
from tests.harness.records import record


def test_key_is_order_independent_and_sensitive():
    assert run_key({"a": 1, "b": [1, 2]}) == run_key({"b": [1, 2], "a": 1})
    assert run_key({"a": 1}) != run_key({"a": 2})


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_atomic_write_never_leaves_partial_files(tmp_path, monkeypatch, fails):
    """A crash inside the write (after the temp file holds the new text) keeps the old file and no temp."""
    import harness.results as results

    path = tmp_path / "r.json"
    write_json_atomic(path, {"x": 1})
    before = path.read_bytes()
    called = []

    def boom(*args):
        called.append(args)
        raise OSError("disk full")

    monkeypatch.setattr(results.os, fails, boom)
    with pytest.raises(OSError, match="disk full"):
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
    store.write("k", rec)
    assert store.has("k") and not list(store.failures()) and list(store.records()) == [rec]


def test_atomic_files_get_ordinary_permissions(tmp_path):
    import os

    path = tmp_path / "r.json"
    write_json_atomic(path, {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
