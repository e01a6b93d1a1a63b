from __future__ import annotations

import pytest
import torch

from harness import brown
from harness.data import calibration_windows, check_dataset_name, eval_windows, resolve_corpus
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
