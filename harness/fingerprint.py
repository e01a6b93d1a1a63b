"""Fingerprints of a run's local inputs, so a changed data file or model folder is never mistaken for the old one.

- A local text file (a dataset): the sha256 of its bytes.
- A local model folder: ``config.json``'s sha256, every file's size, and for each ``*.safetensors``
  file the sha256 of its header (tensor names, dtypes, shapes, offsets). Weight files up to
  ``FULL_HASH_BYTES`` are hashed whole, so an edited weight of a small model changes the print;
  larger shards keep header + size only (hashing 13 GB per sweep would cost minutes), which misses
  an in-place edit that keeps every shape. Modification times are not used: a copied folder keeps its key.
- A hub id: the commit of the locally cached snapshot when there is one (recorded, not keyed:
  whether a cache exists must not change a run's key).

Reading a safetensors header also checks the file: an empty, truncated or corrupt weight file
is refused here, before any work, with one line naming it. Prints are cached per
file and (path, mtime, size), so a sweep hashes each input once however many runs read it.

    fingerprint("data/my.txt")  # -> "sha256:3f2a..."
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable
from pathlib import Path

from harness.errors import ResourceUnavailableError

log = logging.getLogger(__name__)

FULL_HASH_BYTES = 1 << 30
_CHUNK = 1 << 20
_CACHE: dict[tuple[str, str, int, int], str] = {}  # (path, what, mtime_ns, size) -> hex digest


def _cached(path: Path, kind: str, make: Callable[[Path], str]) -> str:
    stat = path.stat()
    key = (str(path.resolve()), kind, stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        log.debug("fingerprinting %s (%s)", path, kind)
        _CACHE[key] = make(path)
    return _CACHE[key]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    return _cached(path, "content", _sha256)


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file, checked against the file's size (one line naming the file if bad)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ResourceUnavailableError(f"model weights {str(path)!r}: empty or truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ResourceUnavailableError(f"model weights {str(path)!r}: corrupt safetensors file (header of {n} bytes, file of {size})")
        header = f.read(n)
    try:
        meta = json.loads(header)
        end = max((t["data_offsets"][1] for k, t in meta.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ResourceUnavailableError(f"model weights {str(path)!r}: corrupt safetensors file (unreadable header)") from None
    if 8 + n + end != size:
        raise ResourceUnavailableError(f"model weights {str(path)!r}: truncated safetensors file ({size} bytes, header says {8 + n + end})")
    return header


def _folder_print(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if path.suffix == ".safetensors":
            h.update(_cached(path, "header", lambda p: hashlib.sha256(safetensors_header(p)).hexdigest()).encode())
            if size <= FULL_HASH_BYTES:
                h.update(_sha256_file(path).encode())
        elif rel == "config.json":
            h.update(_sha256_file(path).encode())
    return h.hexdigest()


def fingerprint(name: str) -> str | None:
    """``sha256:...`` for a local file or model folder, None for anything else (zoo names, corpora, hub ids)."""
    path = Path(name).expanduser()
    if not path.exists():
        return None
    return "sha256:" + (_folder_print(path) if path.is_dir() else _sha256_file(path))


def hub_config_path(repo_id: str) -> str | None:
    """The cached ``config.json`` of hub model ``repo_id``, or None (never touches the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an odd name or an old huggingface_hub: nothing cached to read, not an error
        return None
    return cached if isinstance(cached, str) else None


def hub_commit(repo_id: str) -> str | None:
    """The commit of ``repo_id``'s snapshot in the local HF cache, or None."""
    cached = hub_config_path(repo_id)
    return Path(cached).parent.name if cached else None  # .../snapshots/<commit>/config.json
