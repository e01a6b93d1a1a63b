from __future__ import annotations

import json

import pytest

from harness.results import ResultStore, run_key, write_json_atomic
from tests.harness.records import record


def test_key_is_order_independent_and_sensitive():
    assert run_key({"a": 1, "b": [1, 2]}) == run_key({"b": [1, 2], "a": 1})
    assert run_key({"a": 1}) != run_key({"a": 2})


def test_atomic_write_never_leaves_partial_files(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"x": 1})

    class Boom:
        def __str__(self):
            raise RuntimeError("serialisation failed half way")

    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"x": 2, "y": Boom()})
    assert json.loads(path.read_text()) == {"x": 1}  # the old result survives
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


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
