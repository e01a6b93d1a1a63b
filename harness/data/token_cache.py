"""Token streams kept on disk, so a text is tokenized once per cache rather than once per run.

Every run of a sweep runs in its own process (``executor.isolate``), so an in-memory cache cannot
spare the next run the tokenization of the same calibration text. Tokenizing Brown's train split
(5.5 M characters, 1.2 M tokens) with smollm2's tokenizer takes about 7 s and raises the process's
peak RSS by about 0.8 GB (the tokenizer's per-token strings and offsets, then the Python list of ids)
— on a lazy run of a 3 GB model that is more than the weights it holds at any moment. So the ids are
stored under ``$PTQBENCH_HOME/tokens/`` as safetensors, written atomically, keyed by a hash of

- the tokenizer's whole definition (``backend_tokenizer.to_str()``: vocabulary, merges, normalizer,
  pre-tokenizer and the post-processor that adds BOS) and its class,
- the text itself (sha256), and whether special tokens are added.

Any change to either gives a new key, so a stale entry is never read. A tokenizer without a fast
backend (a slow, pure-Python one) is not cached on disk: its definition cannot be hashed as a whole.
``ptqbench prepare --model M --dataset D`` fills the cache before a sweep.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from harness.paths import cache_home
from harness.runtime import release_freed_memory

log = logging.getLogger(__name__)

TENSOR = "ids"


def tokenizer_digest(tokenizer: object) -> str | None:
    """A hash of everything that decides the tokenizer's output, or None when it has no fast backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(backend.to_str().encode())
    return h.hexdigest()


def cache_file(tokenizer_hash: str, text: str, special_tokens: bool) -> Path:
    h = hashlib.sha256(tokenizer_hash.encode())
    h.update(b"special" if special_tokens else b"plain")
    h.update(hashlib.sha256(text.encode()).digest())
    return cache_home() / "tokens" / f"{h.hexdigest()[:32]}.safetensors"


def cached_ids(tokenizer: object, text: str, special_tokens: bool, tokenize: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The token ids of ``text``: read from the disk cache, or ``tokenize()``d and stored there."""
    digest = tokenizer_digest(tokenizer)
    if digest is None:
        return tokenize()
    path = cache_file(digest, text, special_tokens)
    if path.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)[TENSOR].long()
        except (SafetensorError, OSError, KeyError) as err:  # a damaged entry is redone, never trusted
            log.warning("token cache %s: unreadable (%s); tokenizing again", path, err)
    ids = tokenize()
    release_freed_memory()  # the tokenizer's temporaries are gone; give their pages back (see above)
    _store(path, ids)
    return ids


def _store(path: Path, ids: torch.Tensor) -> None:
    from safetensors.torch import save

    from harness.errors import StorageError
    from harness.atomic import write_bytes_atomic

    small = ids.numel() == 0 or int(ids.max()) < 2**31
    try:
        write_bytes_atomic(path, save({TENSOR: ids.to(torch.int32 if small else torch.int64).contiguous()}), "token cache")
    except StorageError as err:  # a read-only or full cache costs time, not the run
        log.warning("%s", err)
