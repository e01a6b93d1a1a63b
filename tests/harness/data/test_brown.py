from __future__ import annotations

from collections import Counter

from harness.data import brown


def test_parse_and_detokenize():
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, it's/pps+bez fine/jj ./.\n\n\n\tNext/ap one/cd ./.\n"
    paragraphs = brown.parse_file(raw)
    assert len(paragraphs) == 2 and paragraphs[0][0][1] == ("jury", "nn")
    assert brown.detokenize(paragraphs[0][0]) == 'The jury said "no", it\'s fine.'


def test_split_is_by_document_and_fixed():
    docs = brown.documents()
    assert len(docs) == 500
    counts = Counter(d.split for d in docs)
    assert counts == {"train": 459, "test": 41}
    by_category: dict[str, list[str]] = {}
    for d in docs:
        by_category.setdefault(d.category, []).append(d.id)
    for category, ids in by_category.items():
        ordered = sorted(ids)
        expected_test = {ordered[i] for i in range(9, len(ordered), 10)}
        assert {d.id for d in docs if d.category == category and d.split == "test"} == expected_test
    assert set(by_category) >= {"news", "fiction", "romance", "science_fiction"}


def test_tags_are_kept_and_text_has_none():
    doc = brown.documents()[0]
    first = next(iter(doc.sentences))
    assert all(tag for _, tag in first)
    assert "/at " not in doc.text and "/nn" not in doc.text
    words = sum(len(s) for d in brown.documents() for s in d.sentences)
    assert 1_000_000 < words < 1_300_000  # ~1.16M tokens including punctuation


def test_split_text_file_is_the_documents_text_and_is_read_back(tmp_path, monkeypatch):
    import shutil

    # a private copy of the prepared corpus, so the real cache's text files are not touched
    home = tmp_path / "home"
    shutil.copytree(brown.corpus_dir(), home / "data" / brown.corpus_dir().name,
                    ignore=shutil.ignore_patterns("*.txt"))
    monkeypatch.setenv("PTQBENCH_HOME", str(home))
    expected = "\n\n".join(d.text for d in brown.documents() if d.split == "test")
    assert brown.split_text("test") == expected
    stored = brown.corpus_dir() / "test.txt"
    assert stored.read_text(encoding="utf-8") == expected
    stored.write_text("marker", encoding="utf-8")  # the next call reads the file, not the documents
    assert brown.split_text("test") == "marker"
