from __future__ import annotations

import pytest
import torch

from harness.data import brown
from harness.data.windows import calibration_windows, check_dataset_name, eval_windows, resolve_corpus
from harness.errors import ResourceUnavailableError, UnknownNameError


def test_eval_windows_are_the_contiguous_test_stream(smollm2_tokenizer):
    windows = eval_windows("brown", smollm2_tokenizer, seqlen=128)
    ids = smollm2_tokenizer(brown.split_text("test"), add_special_tokens=False)["input_ids"]
    assert windows.shape == (len(ids) // 128, 128)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    assert torch.equal(eval_windows("brown", smollm2_tokenizer, seqlen=128, max_windows=3), windows[:3])


def test_calibration_is_seeded_and_from_train(smollm2_tokenizer):
    a = calibration_windows("brown", smollm2_tokenizer, samples=4, seqlen=64, seed=0)
    b = calibration_windows("brown", smollm2_tokenizer, samples=4, seqlen=64, seed=0)
    c = calibration_windows("brown", smollm2_tokenizer, samples=4, seqlen=64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    train = torch.tensor(smollm2_tokenizer(brown.split_text("train"), add_special_tokens=False)["input_ids"])
    for window in a:
        starts = (train[: -64] == window[0]).nonzero().flatten()
        assert any(torch.equal(train[s : s + 64], window) for s in starts)


def test_local_text_file(tmp_path, smollm2_tokenizer):
    path = tmp_path / "my.txt"
    path.write_text("Hello world. " * 200)
    assert resolve_corpus(str(path)).test() == path.read_text()
    assert eval_windows(str(path), smollm2_tokenizer, seqlen=32).shape[1] == 32


def test_bad_names_are_clear_errors(tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'brown'"):
        check_dataset_name("browm")
    with pytest.raises(ResourceUnavailableError, match="does not exist"):
        check_dataset_name(str(tmp_path / "missing.txt"))


def test_hub_datasets_fail_clearly_offline(monkeypatch, smollm2_tokenizer, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(ResourceUnavailableError, match="wikitext2.*brown"):
        eval_windows("wikitext2", smollm2_tokenizer, seqlen=2048)


def test_too_short_text_is_an_error(tmp_path, smollm2_tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(ResourceUnavailableError, match="fewer than seqlen"):
        eval_windows(str(path), smollm2_tokenizer, seqlen=64)


class BosTokenizer:
    """A stand-in for a LLaMA tokenizer: one id per word, BOS (1) first unless special tokens are off."""

    name_or_path = "bos-words"

    def __len__(self) -> int:
        return 1000

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [2 + sum(map(ord, w)) % 997 for w in text.split()]
        ids = ([1] if add_special_tokens else []) + ids
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def _official_wikitext2(tok, train_text, test_text, nsamples, seed, seqlen):
    """The official loop (QLLM datautils.get_wikitext2), re-implemented: the module RNG, pt tensors."""
    import random

    trainenc, testenc = tok(train_text, return_tensors="pt"), tok(test_text, return_tensors="pt")
    random.seed(seed)
    calib = []
    for _ in range(nsamples):
        i = random.randint(0, trainenc["input_ids"].shape[1] - seqlen - 1)
        calib.append(trainenc["input_ids"][:, i : i + seqlen])
    ids = testenc["input_ids"]
    n = ids.numel() // seqlen
    return torch.cat(calib), torch.cat([ids[:, i * seqlen : (i + 1) * seqlen] for i in range(n)])


def _official_c4(tok, train_docs, val_docs, nsamples, seed, seqlen, windows=256):
    import random

    random.seed(seed)
    calib = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(train_docs) - 1)
            enc = tok(train_docs[i], return_tensors="pt")
            if enc["input_ids"].shape[1] > seqlen:
                break
        i = random.randint(0, enc["input_ids"].shape[1] - seqlen - 1)
        calib.append(enc["input_ids"][:, i : i + seqlen])
    random.seed(0)
    val = []
    for _ in range(windows):
        while True:
            i = random.randint(0, len(val_docs) - 1)
            tmp = tok(val_docs[i], return_tensors="pt")
            if tmp["input_ids"].shape[1] >= seqlen:
                break
        i = random.randint(0, tmp["input_ids"].shape[1] - seqlen - 1)
        val.append(tmp["input_ids"][:, i : i + seqlen])
    return torch.cat(calib), torch.cat(val)


def _fixture_docs(n, seed):
    import random

    rng = random.Random(seed)
    words = brown.split_text("train").split()[:20000]
    docs = []
    for _ in range(n):
        # never exactly seqlen tokens with the BOS: the official evaluation sampler would fail on it
        start, length = rng.randint(0, len(words) - 300), rng.choice([n for n in range(5, 121) if n != 63])
        docs.append(" ".join(words[start : start + length]))
    return docs


def test_wikitext2_and_c4_windows_match_the_official_loaders(monkeypatch):
    from harness.data import windows as data

    data._CACHE.clear()
    train_docs, val_docs = _fixture_docs(300, 1), _fixture_docs(300, 2)
    train_text, test_text = "\n\n".join(train_docs), "\n\n".join(val_docs)
    monkeypatch.setattr(data, "_wikitext2", lambda split: train_text if split == "train" else test_text)
    monkeypatch.setattr(data, "c4_documents", lambda split: train_docs if split == "train" else val_docs)
    tok, seqlen = BosTokenizer(), 64
    calib, test = _official_wikitext2(tok, train_text, test_text, nsamples=8, seed=2, seqlen=seqlen)
    assert test[0, 0] == 1 and (calib == 1).sum() <= 1  # the BOS starts the stream, and only there
    assert torch.equal(calibration_windows("wikitext2", tok, 8, seqlen, seed=2), calib)
    assert torch.equal(eval_windows("wikitext2", tok, seqlen), test)
    calib, val = _official_c4(tok, train_docs, val_docs, nsamples=8, seed=2, seqlen=seqlen)
    assert torch.equal(calibration_windows("c4", tok, 8, seqlen, seed=2), calib)
    assert torch.equal(eval_windows("c4", tok, seqlen), val)
    # Brown and local files stay one stream without special tokens
    assert 1 not in eval_windows("brown", tok, seqlen)[:4].flatten().tolist()
    data._CACHE.clear()
