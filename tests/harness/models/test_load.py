from __future__ import annotations

import pytest
import torch

from harness.errors import ResourceUnavailableError, UnknownNameError
from harness.models import ZOO, load_model, resolve_device, resolve_dtype, tiny_llama


@pytest.mark.smollm2
def test_zoo_smollm2_is_the_real_llama_architecture(_smollm2_loaded):
    model = _smollm2_loaded.model
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert "gguf" not in str(getattr(cfg, "quantization_config", ""))  # saved as plain weights


@pytest.mark.smollm2
def test_smollm2_predicts_english(_smollm2_loaded):
    """A trained model, not random weights: it finds ' the' far likelier after 'on' than chance."""
    tok, model = _smollm2_loaded.tokenizer, _smollm2_loaded.model
    ids = torch.tensor([tok("The cat sat on", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        probs = model(ids).logits[0, -1].softmax(-1)
    the = tok(" the", add_special_tokens=False)["input_ids"][0]
    assert probs[the] > 0.1 > 1 / len(tok)


def test_load_by_local_path(tmp_path, smollm2_tokenizer):
    model = tiny_llama(seed=3, vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(tmp_path / "m")
    smollm2_tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), dtype="float32")
    assert loaded.source.startswith("local:")
    saved, got = model.state_dict(), loaded.model.state_dict()
    assert set(got) == set(saved)  # by name: no tensor missing, renamed or extra
    for name, tensor in saved.items():
        torch.testing.assert_close(got[name], tensor, msg=name)


def test_tiny_random_is_seeded():
    a, b, c = tiny_llama(seed=1), tiny_llama(seed=1), tiny_llama(seed=2)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_unknown_name_suggests_the_zoo():
    with pytest.raises(UnknownNameError) as err:
        load_model("smollm2-153m")
    assert "did you mean 'smollm2-135m'" in str(err.value) and "\n" not in str(err.value)


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(UnknownNameError, match="existing folder"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResourceUnavailableError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ResourceUnavailableError, match="could not be loaded"):
        load_model("no-such-org/no-such-model")


def test_zoo_aliases_and_device_choice():
    assert ZOO["llama-2-7b"].hub_id == "meta-llama/Llama-2-7b-hf"
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
