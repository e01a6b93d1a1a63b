"""The offline Brown tasks (checked against the corpus itself) and the task-data YAML generation."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from harness.data.brown import detokenize, documents
from harness.errors import ConfigError
from harness.evaluation.zeroshot_tasks import (
    CHOICES,
    CLOZE_SENTENCES,
    CONTENT_TAGS,
    CONTEXT_SENTENCES,
    build_cloze,
    build_nextsent,
    task_data_yaml,
)

FIXTURES = Path(__file__).parent / "zeroshot_data"
STANDARD = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")


@pytest.fixture(scope="module")
def test_docs():
    return [d for d in documents() if d.split == "test"]


@pytest.fixture(scope="module")
def nextsent(test_docs):
    return build_nextsent(test_docs)


@pytest.fixture(scope="module")
def cloze(test_docs):
    return build_cloze(test_docs)


def _labels_balanced(items: list[dict]) -> None:
    counts = Counter(item["label"] for item in items)
    assert set(counts) == set(range(CHOICES))
    assert all(0.2 < n / len(items) < 0.3 for n in counts.values()), counts  # no position cue


def test_nextsent_items_are_true_continuations_with_same_category_distractors(test_docs, nextsent):
    by_id = {d.id: d for d in test_docs}
    texts = {d.id: [detokenize(s) for s in d.sentences if any(w[:1].isalnum() for w, _ in s)] for d in test_docs}
    assert len(nextsent) > 500
    _labels_balanced(nextsent)
    for item in nextsent:
        doc_id, start = item["id"].rsplit("-", 1)
        sentences = texts[doc_id]
        start = int(start)
        assert item["context"] == " ".join(sentences[start : start + CONTEXT_SENTENCES])
        endings = item["endings"]
        assert len(endings) == CHOICES == len(set(endings))
        assert endings[item["label"]] == sentences[start + CONTEXT_SENTENCES]
        category = by_id[doc_id].category
        for i, ending in enumerate(endings):
            if i != item["label"]:
                sources = [o for o, t in texts.items() if ending in t]
                assert sources and doc_id not in sources
                assert any(by_id[o].category == category for o in sources)


def test_nextsent_distractors_are_close_in_length(nextsent):
    gaps = []
    for item in nextsent:
        true_len = len(item["endings"][item["label"]].split())
        gaps += [abs(len(e.split()) - true_len) / true_len for i, e in enumerate(item["endings"]) if i != item["label"]]
    assert sorted(gaps)[len(gaps) // 2] < 0.1  # the median distractor is within 10% of the true length


def test_cloze_masks_the_last_content_word_with_same_tag_distractors(test_docs, cloze):
    by_id = {d.id: d for d in test_docs}
    assert len(cloze) > 1000
    _labels_balanced(cloze)
    for item in cloze[:300]:
        doc_id, start = item["id"].rsplit("-", 1)
        doc = by_id[doc_id]
        sentences = [s for s in doc.sentences if any(w[:1].isalnum() for w, _ in s)]
        passage = sentences[int(start) : int(start) + CLOZE_SENTENCES]
        words_in_passage = {w.lower() for s in passage for w, _ in s}
        true_word = item["choices"][item["label"]]
        last = passage[-1]
        # The true word, with its tag, is where the text stops, and no content word follows it.
        pos = max(i for i, token in enumerate(last) if token == (true_word, item["tag"]))
        assert item["passage"].endswith(detokenize(last[:pos]))
        assert not any(t in CONTENT_TAGS and w.isalpha() and w.islower() and len(w) >= 3 for w, t in last[pos + 1 :])
        tags_in_doc = {(w, t) for s in doc.sentences for w, t in s}
        for i, word in enumerate(item["choices"]):
            if i != item["label"]:
                assert (word, item["tag"]) in tags_in_doc  # same tag, same document
                assert word not in words_in_passage
        assert len(set(item["choices"])) == CHOICES


def test_builds_are_deterministic(test_docs, nextsent, cloze):
    assert build_nextsent(test_docs) == nextsent
    assert build_cloze(test_docs) == cloze
    assert build_cloze(test_docs, seed=1) != cloze


# --- task data -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin_index():
    from harness.evaluation.zeroshot import _builtin_index

    return _builtin_index()


@pytest.mark.parametrize("task", STANDARD)
def test_task_data_yaml_includes_the_installed_task_and_overrides_only_data(task, builtin_index):
    from lm_eval.tasks._yaml_loader import load_yaml

    installed_path = Path(builtin_index[task].yaml_path)
    installed = load_yaml(installed_path, resolve_func=False)
    spec = task_data_yaml(task, installed, installed_path, FIXTURES)
    assert spec["include"] == str(installed_path.resolve()) and Path(spec["include"]).is_absolute()
    assert spec["dataset_path"] == "json" and spec["dataset_name"] is None
    files = spec["dataset_kwargs"]["data_files"]
    assert set(files) == {p.stem for p in (FIXTURES / task).iterdir()}
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in files.values())
    # Every split the task names is either served by a file or nulled.
    for key in ("training_split", "validation_split", "test_split"):
        if installed.get(key) is not None:
            assert installed[key] in files or spec.get(key, "missing") is None
    # Nothing else of the task changes: what lm-eval merges equals the installed task plus our keys.
    assert set(spec) - {"include"} <= {"task", "dataset_path", "dataset_name", "dataset_kwargs",
                                       "training_split", "validation_split", "test_split"}


def test_task_data_without_the_scored_split_is_one_clear_error(tmp_path, builtin_index):
    from lm_eval.tasks._yaml_loader import load_yaml

    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "train.jsonl").write_text((FIXTURES / "arc_easy" / "test.jsonl").read_text())
    path = Path(builtin_index["arc_easy"].yaml_path)
    with pytest.raises(ConfigError, match=r"task_data: task 'arc_easy' is scored on its 'test' split") as err:
        task_data_yaml("arc_easy", load_yaml(path, resolve_func=False), path, tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no folder"):
        task_data_yaml("piqa", {}, path, tmp_path)


def test_task_data_parquet(tmp_path, builtin_index):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lm_eval.tasks._yaml_loader import load_yaml

    rows = [json.loads(line) for line in (FIXTURES / "winogrande" / "validation.jsonl").read_text().splitlines()]
    (tmp_path / "winogrande").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "winogrande" / "validation.parquet")
    path = Path(builtin_index["winogrande"].yaml_path)
    spec = task_data_yaml("winogrande", load_yaml(path, resolve_func=False), path, tmp_path)
    assert spec["dataset_path"] == "parquet"
    assert spec["training_split"] is None  # winogrande names a train split the folder lacks
    assert yaml.safe_load(yaml.safe_dump(spec)) == spec
