"""Shared fixtures. Tests never touch the network: models and text come from packages (see README).

- ``tiny_model``: a fresh 2-layer random LLaMA (GQA) per test, built in code.
- ``smollm2``: the real smollm2-135m (loaded once per session; tests get a deep copy to mutate).
- ``smollm2_tokenizer``: smollm2's tokenizer alone (without the model's weights).
- ``lazy_folder``: a saved 4-block random LLaMA that loads lazily (block checkpoints, resume tests).
- ``brown_calib`` / ``brown_eval``: real Brown token windows for smollm2 tests, small sizes.
- ``device``: CUDA when present, else CPU (tests run the same code on both).
- ``fast_options(name)``: options that make a registered method take seconds on the tiny model (the
  defaults for a method not listed: a plugin's defaults are its own business); for tests parametrised
  over the registry.

A test that uses the real model (``SMOLLM2_FIXTURES``, directly or through another fixture) must
carry the ``smollm2`` marker, so ``-m "not smollm2"`` really skips the real-model tests; collection
fails with the list of tests that do not. Tests that start real processes or run whole sweeps carry
``slow``: ``pytest -n auto -m "not smollm2 and not slow"`` is the inner loop.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N workers share the cores, so each (and each process its tests start) computes on
    # one thread; two processes of several threads each on the same cores slow each other 5-20x
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# Small budgets for the tiny model: the training and search methods' official budgets take minutes.
FAST_OPTIONS: dict[str, dict] = {
    "omniquant": {"epochs": 1, "max_samples": 2},
    "qllm": {"epochs": 1, "grid_steps": 4},
    "os+": {"search_samples": 2},
    "spinquant": {"steps": 2},
    "flatquant": {"epochs": 1},
}


def fast_options(name: str) -> dict:
    return dict(FAST_OPTIONS.get(name, {}))


SMOLLM2_FIXTURES = frozenset({"_smollm2_loaded", "smollm2", "brown_calib", "brown_eval", "fp_ppl", "w4a4_ppl"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects: an unmarked test would otherwise run in the fast suite
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [item.nodeid for item in items
                if SMOLLM2_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("smollm2") is None]
    if unmarked:
        raise pytest.UsageError("tests that use the real smollm2 model need @pytest.mark.smollm2: " + ", ".join(unmarked))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def tiny_model():
    from harness.models import tiny_llama

    return tiny_llama(seed=0, vocab_size=256)


@pytest.fixture
def tiny_tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 32), generator=g)


@pytest.fixture(scope="session")
def _smollm2_loaded():
    from harness.models import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture
def smollm2(_smollm2_loaded):
    """(model, tokenizer): a private copy of the real model that the test may modify."""
    return copy.deepcopy(_smollm2_loaded.model), _smollm2_loaded.tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """smollm2's tokenizer, loaded with the tiny random model (same vocabulary) so no smollm2 weights are read."""
    from harness.models import load_model

    return load_model("tiny-random-llama", dtype="float32", device="cpu").tokenizer


@pytest.fixture(scope="session")
def lazy_folder(tmp_path_factory, smollm2_tokenizer):
    """A 4-block random LLaMA saved in 2 MB shards: it loads lazily, so runs on it keep block checkpoints."""
    from harness.models import tiny_llama

    path = tmp_path_factory.mktemp("lazy") / "model"
    tiny_llama(0, num_hidden_layers=4, tie_word_embeddings=False).save_pretrained(path, max_shard_size="2MB")
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def brown_calib(smollm2_tokenizer) -> torch.Tensor:
    from harness.data.windows import calibration_windows

    return calibration_windows("brown", smollm2_tokenizer, samples=16, seqlen=256, seed=0)


@pytest.fixture(scope="session")
def brown_eval(smollm2_tokenizer) -> torch.Tensor:
    from harness.data.windows import eval_windows

    return eval_windows("brown", smollm2_tokenizer, seqlen=256, max_windows=24)
