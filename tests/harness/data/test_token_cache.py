"""The token cache on disk: the ids it returns are the tokenizer's own, a text is tokenized once per
cache, anything that changes the ids changes the entry, and a damaged or unwritable cache costs time only."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from harness.data.token_cache import cached_ids, tokenizer_digest

TEXT = "The Fulton County Grand Jury said Friday an investigation of recent primary elections produced no evidence.\n\n" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_HOME", str(tmp_path))
    return tmp_path / "tokens"


def direct(tokenizer, text: str, special: bool) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=special)["input_ids"], dtype=torch.long)


class Counting:
    def __init__(self, tokenizer, text: str, special: bool) -> None:
        self.calls, self.args = 0, (tokenizer, text, special)

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return direct(*self.args)


def test_tokenized_once_then_read_back_equal(cache, smollm2_tokenizer):
    tokenize = Counting(smollm2_tokenizer, TEXT, False)
    first = cached_ids(smollm2_tokenizer, TEXT, False, tokenize)
    again = cached_ids(smollm2_tokenizer, TEXT, False, tokenize)
    assert tokenize.calls == 1
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert again.dtype == torch.long
    assert torch.equal(first, direct(smollm2_tokenizer, TEXT, False)) and torch.equal(again, first)


def test_text_and_special_tokens_are_part_of_the_key(cache, smollm2_tokenizer):
    other = TEXT + " One more sentence."
    for text, special in ((TEXT, False), (TEXT, True), (other, False)):
        ids = cached_ids(smollm2_tokenizer, text, special, Counting(smollm2_tokenizer, text, special))
        assert torch.equal(ids, direct(smollm2_tokenizer, text, special))
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_another_tokenizer_definition_gets_its_own_entry(cache, smollm2_tokenizer):
    import copy

    changed = copy.deepcopy(smollm2_tokenizer)
    changed.add_tokens(["Fulton County"])  # changes the ids of TEXT
    assert tokenizer_digest(changed) != tokenizer_digest(smollm2_tokenizer)
    a = cached_ids(smollm2_tokenizer, TEXT, False, Counting(smollm2_tokenizer, TEXT, False))
    b = cached_ids(changed, TEXT, False, Counting(changed, TEXT, False))
    assert not torch.equal(a, b) and torch.equal(b, direct(changed, TEXT, False))


def test_digest_is_the_same_in_another_process(smollm2_tokenizer, tmp_path):
    smollm2_tokenizer.save_pretrained(tmp_path / "tok")
    code = ("import sys; from transformers import AutoTokenizer; from harness.data.token_cache import tokenizer_digest; "
            f"print(tokenizer_digest(AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    from transformers import AutoTokenizer

    assert out == tokenizer_digest(AutoTokenizer.from_pretrained(tmp_path / "tok"))


def test_damaged_entry_is_redone_with_a_warning(cache, smollm2_tokenizer, caplog):
    tokenize = Counting(smollm2_tokenizer, TEXT, False)
    cached_ids(smollm2_tokenizer, TEXT, False, tokenize)
    (entry,) = cache.glob("*.safetensors")
    entry.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    ids = cached_ids(smollm2_tokenizer, TEXT, False, tokenize)
    assert tokenize.calls == 2 and torch.equal(ids, direct(smollm2_tokenizer, TEXT, False))
    assert "unreadable" in caplog.text
    assert torch.equal(cached_ids(smollm2_tokenizer, TEXT, False, tokenize), ids) and tokenize.calls == 2  # rewritten


def test_unwritable_cache_still_returns_the_ids(tmp_path, monkeypatch, smollm2_tokenizer, caplog):
    blocker = tmp_path / "home"
    blocker.mkdir()
    (blocker / "tokens").write_text("a file where the cache folder would be")
    monkeypatch.setenv("PTQBENCH_HOME", str(blocker))
    ids = cached_ids(smollm2_tokenizer, TEXT, False, Counting(smollm2_tokenizer, TEXT, False))
    assert torch.equal(ids, direct(smollm2_tokenizer, TEXT, False))
    assert "token cache" in caplog.text


def test_tokenizer_without_a_fast_backend_is_not_cached(cache):
    class Slow:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    tokenize = Counting(Slow(), TEXT, False)
    assert tokenizer_digest(Slow()) is None
    for _ in range(2):
        assert torch.equal(cached_ids(Slow(), TEXT, False, tokenize), direct(Slow(), TEXT, False))
    assert tokenize.calls == 2 and not cache.exists()


def test_token_stream_uses_the_disk_cache(cache, smollm2_tokenizer, monkeypatch, tmp_path):
    from harness.data import windows as data

    text_file = tmp_path / "corpus.txt"
    text_file.write_text(TEXT)
    monkeypatch.setattr(data, "_CACHE", {})
    ids = data.token_stream(str(text_file), "test", smollm2_tokenizer)
    assert torch.equal(ids, direct(smollm2_tokenizer, TEXT, False))
    assert len(list(cache.glob("*.safetensors"))) == 1
    monkeypatch.setattr(data, "_CACHE", {})  # a new process: the in-memory cache is empty
    monkeypatch.setattr(data, "_ids", lambda *a, **k: pytest.fail("tokenized again instead of reading the cache"))
    assert torch.equal(data.token_stream(str(text_file), "test", smollm2_tokenizer), ids)
