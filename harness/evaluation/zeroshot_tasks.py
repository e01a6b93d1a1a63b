"""Task definitions that lm-eval reads from an include path: the offline Brown tasks and local task data.

Two offline multiple-choice tasks are built deterministically from the Brown test split (with its
POS tags), written as JSONL under the cache and registered through generated lm-eval YAMLs:

- ``brown_nextsent`` (HellaSwag-like): three consecutive sentences of a document, then the true next
  sentence and three distractor sentences taken from *other* test documents of the same category,
  chosen among those closest in length to the true one (so length is no cue; only coherence is).
- ``brown_cloze``: a passage of two sentences cut just before the last content word (noun, verb,
  adjective or adverb) of its last sentence; the choices are that word and three words with the same
  Brown tag from elsewhere in the same document, chosen among those closest to it in corpus
  frequency and absent from the passage (so neither the tag, nor word frequency, nor the topic, nor
  copying from the passage gives the answer away).

Both have four choices (chance 25%) and report lm-eval's ``acc`` and ``acc_norm``. Items are
shuffled with a fixed seed before writing, so lm-eval's ``limit`` (the first N items) is a sample of
every category rather than the first documents.

``task_data_yaml`` points a standard lm-eval task (piqa, arc_easy, ...) at local copies of its data:
the generated YAML ``include:``s the installed task file and overrides only the dataset fields.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from harness.data.brown import Document, detokenize, documents
from harness.errors import ConfigError
from harness.paths import cache_home

BROWN_TASKS = ("brown_nextsent", "brown_cloze")
# Bump when the item construction changes: the data folder and each task's lm-eval version follow it.
BUILD_VERSION = 1
SEED = 0
CHOICES = 4
CONTEXT_SENTENCES = 3  # brown_nextsent's context
CLOZE_SENTENCES = 2  # brown_cloze's passage
# Sentences usable as an ending (true or distractor): long enough to carry content, short enough to
# keep four continuations cheap to score.
ENDING_WORDS = (8, 40)
# Among how many nearest candidates (by length / by frequency) the three distractors are drawn.
NEAREST = 12
# Tags of content words that may be masked (exact Brown tags: no -tl title or -hl headline words).
CONTENT_TAGS = frozenset({"nn", "nns", "jj", "rb", "vb", "vbd", "vbg", "vbn", "vbz"})
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


# --- the Brown tasks -------------------------------------------------------------------------
def _clean(sentence: tuple[tuple[str, str], ...]) -> bool:
    """A sentence fit to be an ending: plain prose (no headline tags), of a bounded length."""
    lo, hi = ENDING_WORDS
    words = [w for w, t in sentence if w[:1].isalnum()]
    return lo <= len(words) <= hi and not any("-hl" in t for _, t in sentence) and sentence[0][0][:1].isalpha()


def _n_words(sentence: tuple[tuple[str, str], ...]) -> int:
    return sum(1 for w, _ in sentence if w[:1].isalnum())


def _nearest(candidates: Iterable[tuple[str, float]], rng: random.Random) -> list[str]:
    """The ``NEAREST`` candidates of smallest distance, ties broken at random (not alphabetically:
    sorted ties would make every distractor start with 'a')."""
    pool = list(candidates)
    rng.shuffle(pool)
    pool.sort(key=lambda c: c[1])  # stable: shuffled order survives among equal distances
    return [c[0] for c in pool[:NEAREST]]


def _sentences(doc: Document) -> list[tuple[tuple[str, str], ...]]:
    """The document's sentences that contain a word (Brown has lone punctuation 'sentences')."""
    return [s for s in doc.sentences if _n_words(s) > 0]


def build_nextsent(docs: Iterable[Document], seed: int = SEED) -> list[dict[str, Any]]:
    """Next-sentence items from non-overlapping windows of four sentences of each document."""
    docs = list(docs)
    by_category: dict[str, list[Document]] = defaultdict(list)
    for d in docs:
        by_category[d.category].append(d)
    items = []
    for doc in docs:
        others = [o for o in by_category[doc.category] if o.id != doc.id]
        if not others:  # a category with one test document has no same-category distractors
            continue
        pool = sorted({detokenize(s): _n_words(s) for o in others for s in o.sentences if _clean(s)}.items())
        sentences = _sentences(doc)
        for start in range(0, len(sentences) - CONTEXT_SENTENCES, CONTEXT_SENTENCES + 1):
            context, target = sentences[start : start + CONTEXT_SENTENCES], sentences[start + CONTEXT_SENTENCES]
            if not _clean(target):
                continue
            true_text, length = detokenize(target), _n_words(target)
            rng = random.Random(f"{seed}:nextsent:{doc.id}:{start}")
            candidates = _nearest(((text, abs(n - length)) for text, n in pool if text != true_text), rng)
            distractors = rng.sample(candidates, CHOICES - 1)
            label = rng.randrange(CHOICES)
            endings = distractors[:label] + [true_text] + distractors[label:]
            items.append({"id": f"{doc.id}-{start}", "category": doc.category,
                          "context": " ".join(detokenize(s) for s in context), "endings": endings, "label": label})
    random.Random(seed).shuffle(items)
    return items


def _word_ok(word: str) -> bool:
    return len(word) >= 3 and word.isalpha() and word.islower()


def build_cloze(docs: Iterable[Document], seed: int = SEED) -> list[dict[str, Any]]:
    """Cloze items from non-overlapping passages of two sentences of each document.

    Distractors come from the same document (outside the passage), so they are on topic: only the
    passage's own context tells the true word from them.
    """
    docs = list(docs)
    freq: dict[str, Counter] = defaultdict(Counter)
    for d in docs:
        for s in d.sentences:
            for w, t in s:
                if t in CONTENT_TAGS and _word_ok(w):
                    freq[t][w] += 1
    items = []
    for doc in docs:
        in_doc: dict[str, set[str]] = defaultdict(set)
        for s in doc.sentences:
            for w, t in s:
                if t in CONTENT_TAGS and _word_ok(w):
                    in_doc[t].add(w)
        sentences = _sentences(doc)
        for start in range(0, len(sentences) - CLOZE_SENTENCES + 1, CLOZE_SENTENCES):
            passage = sentences[start : start + CLOZE_SENTENCES]
            last = passage[-1]
            # The last content word, with at least four tokens of its own sentence before it.
            pos = next((i for i in range(len(last) - 1, 3, -1) if last[i][1] in CONTENT_TAGS and _word_ok(last[i][0])), None)
            if pos is None:
                continue
            word, tag = last[pos]
            seen = {w.lower() for s in passage for w, _ in s}
            target = math.log(freq[tag][word])
            rng = random.Random(f"{seed}:cloze:{doc.id}:{start}")
            pool = sorted(w for w in in_doc[tag] if w not in seen)
            candidates = _nearest(((w, abs(math.log(freq[tag][w]) - target)) for w in pool), rng)
            if len(candidates) < CHOICES - 1:
                continue
            distractors = rng.sample(candidates, CHOICES - 1)
            label = rng.randrange(CHOICES)
            choices = distractors[:label] + [word] + distractors[label:]
            text = " ".join([*(detokenize(s) for s in passage[:-1]), detokenize(last[:pos])])
            items.append({"id": f"{doc.id}-{start}", "category": doc.category, "tag": tag,
                          "passage": text, "choices": choices, "label": label})
    random.Random(seed).shuffle(items)
    return items


def _task_yaml(name: str, data_file: Path, text_field: str, choices_field: str) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "output_type": "multiple_choice",
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
        "doc_to_text": "{{" + text_field + "}}",
        "doc_to_choice": choices_field,
        "doc_to_target": "label",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": float(BUILD_VERSION)},
    }


def brown_task_dir() -> Path:
    """The include path holding the Brown tasks' JSONL and YAML (built on first use)."""
    folder = cache_home() / "zeroshot" / f"brown-tasks-v{BUILD_VERSION}"
    if all((folder / f"{name}.yaml").exists() for name in BROWN_TASKS):
        return folder
    test = [d for d in documents() if d.split == "test"]
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    specs = {"brown_nextsent": (build_nextsent(test), "context", "endings"),
             "brown_cloze": (build_cloze(test), "passage", "choices")}
    for name, (items, text_field, choices_field) in specs.items():
        with (tmp / f"{name}.jsonl").open("w") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
        # The YAML names the JSONL at its final place (the folder is renamed below).
        task = _task_yaml(name, folder / f"{name}.jsonl", text_field, choices_field)
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    if folder.exists():  # a half-built folder from an interrupted run
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    tmp.replace(folder)
    return folder


# --- local copies of standard tasks' data ----------------------------------------------------
def split_file(folder: Path, split: str) -> Path | None:
    for ext in ("jsonl", "parquet"):
        if (path := folder / f"{split}.{ext}").is_file():
            return path
    return None


def task_data_yaml(task: str, installed: dict[str, Any], installed_path: Path, data_dir: Path) -> dict[str, Any]:
    """An lm-eval YAML that includes the installed task and reads its splits from ``data_dir/<task>/``.

    ``installed`` is the installed task's config (includes resolved). Splits the task names but the
    folder lacks are set to null; the split the task is scored on must be present.
    """
    folder = data_dir / task
    where = "evaluation.zeroshot.task_data"
    if not folder.is_dir():
        raise ConfigError(f"{where}: no folder {str(folder)!r} for task {task!r}; "
                          f"put the task's splits there as <split>.jsonl or <split>.parquet")
    data_files: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    for key in SPLIT_KEYS:
        split = installed.get(key)
        if split is None:
            continue
        path = split_file(folder, split)
        if path is None:
            overrides[key] = None
        else:
            data_files[split] = str(path.resolve())
    scored = installed.get("test_split") or installed.get("validation_split")
    if scored is None or scored not in data_files:
        raise ConfigError(f"{where}: task {task!r} is scored on its {scored!r} split; "
                          f"expected {str(folder / f'{scored}.jsonl')!r} (or .parquet)")
    formats = {Path(p).suffix for p in data_files.values()}
    if len(formats) > 1:
        raise ConfigError(f"{where}: {str(folder)!r} mixes JSONL and parquet; use one format per task")
    return {
        "include": str(installed_path.resolve()),
        "task": task,
        "dataset_path": "parquet" if formats == {".parquet"} else "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
        **overrides,
    }


def write_task_data_yamls(tasks: Iterable[str], index: dict[str, Any], data_dir: str | Path) -> Path:
    """Generate the include-path YAMLs for ``tasks`` read from ``data_dir``; return the folder.

    ``index`` maps a task name to its lm-eval index entry (``.yaml_path``). The folder is named after
    the data folder's absolute path, so repeated runs reuse (and rewrite) the same files.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    data_dir = Path(data_dir).expanduser().resolve()
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    out = cache_home() / "zeroshot" / f"task-data-{digest}"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.yaml"):  # tasks of an earlier run must not linger in the include path
        stale.unlink()
    for task in tasks:
        installed_path = Path(index[task].yaml_path)
        installed = load_yaml(installed_path, resolve_func=False)
        spec = task_data_yaml(task, installed, installed_path, data_dir)
        (out / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out
