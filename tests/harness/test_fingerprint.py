"""Fingerprints of local inputs: content hashes, safetensors header checks, once per file state, and run keys."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from harness.errors import ResourceUnavailableError
from harness import fingerprint as fp
from harness.run.config import parse_config
from harness.run.execute import plan


def safetensors_bytes(values: bytes, name: str = "w") -> bytes:
    header = json.dumps({name: {"dtype": "U8", "shape": [len(values)], "data_offsets": [0, len(values)]}}).encode()
    return struct.pack("<Q", len(header)) + header + values


def rewrite(path: Path, data: bytes) -> None:
    """Write ``data`` as a later edit would: prints are cached per (path, mtime, size), and two writes in
    the same clock tick can share an mtime, so move it on explicitly."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_bytes(data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_a_file_print_is_its_sha256_and_follows_its_content(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one")
    assert fp.fingerprint(str(path)) == "sha256:" + hashlib.sha256(b"one").hexdigest()
    rewrite(path, b"two")
    assert fp.fingerprint(str(path)) == "sha256:" + hashlib.sha256(b"two").hexdigest()
    assert fp.fingerprint("brown") is None and fp.fingerprint("tiny-random-llama") is None


def test_a_folder_print_follows_config_and_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(b"abcd"))
    first = fp.fingerprint(str(tmp_path))
    rewrite(tmp_path / "model.safetensors", safetensors_bytes(b"abce"))  # same header, one weight changed
    second = fp.fingerprint(str(tmp_path))
    rewrite(tmp_path / "config.json", b'{"model_type": "llama", "rope_theta": 1}')
    third = fp.fingerprint(str(tmp_path))
    assert len({first, second, third}) == 3


def test_large_weights_are_printed_by_header_and_size(tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 10)  # every file counts as large here
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(b"abcd" * 10))
    first = fp.fingerprint(str(tmp_path))
    rewrite(tmp_path / "model.safetensors", safetensors_bytes(b"abce" * 10))
    assert fp.fingerprint(str(tmp_path)) == first  # the documented blind spot: same shapes, same size
    rewrite(tmp_path / "model.safetensors", safetensors_bytes(b"abce" * 10, name="v"))
    assert fp.fingerprint(str(tmp_path)) != first


@pytest.mark.parametrize("content, needle", [
    (b"", "empty or truncated safetensors file (0 bytes)"),
    (struct.pack("<Q", 10**9) + b"{}", "corrupt safetensors file (header of 1000000000 bytes"),
    (struct.pack("<Q", 2) + b"[]", "unreadable header"),
    (safetensors_bytes(b"abcd")[:-1], "truncated safetensors file"),
])
def test_a_broken_weight_file_is_named(tmp_path, content, needle):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ResourceUnavailableError, match="model.safetensors") as err:
        fp.fingerprint(str(tmp_path))
    assert needle in str(err.value)


def test_each_file_state_is_hashed_once(tmp_path, monkeypatch):
    calls = []
    real = fp._sha256
    monkeypatch.setattr(fp, "_sha256", lambda p: calls.append(p) or real(p))
    path = tmp_path / "t.txt"
    path.write_text("x" * 100)
    for _ in range(3):
        fp.fingerprint(str(path))
    assert len(calls) == 1
    path.write_text("y" * 101)
    fp.fingerprint(str(path))
    assert len(calls) == 2


SWEEP = {"name": "k", "models": ["tiny-random-llama"], "methods": ["rtn"], "bits": ["W8A8"],
         "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 32}}}


def test_keys_follow_local_files_and_stay_put_for_named_inputs(tmp_path):
    named = plan(parse_config(SWEEP))
    assert all("inputs" not in r.identity() for r in named)  # zoo model + brown: keys as before fingerprints
    data = tmp_path / "t.txt"
    data.write_text("some text " * 50)
    local = {**SWEEP, "evaluation": {"ppl": {"datasets": [str(data)], "seqlen": 32}}}
    first = plan(parse_config(local))
    assert all(r.identity()["inputs"] == {str(data): fp.fingerprint(str(data))} for r in first)
    rewrite(data, b"other text " * 50)
    second = plan(parse_config(local))
    assert {r.key for r in first}.isdisjoint({r.key for r in second})
