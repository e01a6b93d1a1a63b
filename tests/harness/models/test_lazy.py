"""harness.models.lazy: a skeleton on meta whose blocks come from safetensors shards, checked against the eager model."""
from __future__ import annotations

import copy

import pytest
import torch

from harness import BitSpec, QuantContext, get_method
from harness.models.lazy import block_store, embedding_and_head_offloaded, is_lazy, materialized, weight_map
from harness.evaluation.evaluate import perplexity, perplexity_blockwise
from harness.models import load_model, tiny_llama

CPU = torch.device("cpu")
CTX = QuantContext(device=CPU, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smollm2_tokenizer):
    """A 3-layer random LLaMA (untied head; smollm2's vocabulary, so real text fits) in several safetensors shards."""
    path = tmp_path_factory.mktemp("lazy") / "model"
    model = tiny_llama(0, num_hidden_layers=3, tie_word_embeddings=False)
    model.save_pretrained(path, max_shard_size="2MB")
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def eager(folder):
    return load_model(str(folder), dtype="float32", device="cpu").model


@pytest.fixture
def lazy(folder):
    return load_model(str(folder), dtype="float32", device="cpu", lazy=True).model


def test_folder_is_sharded_and_blocks_start_on_meta(folder, lazy, eager):
    assert len(set(weight_map(folder).values())) > 2
    assert is_lazy(lazy) and not is_lazy(eager)
    for name, p in lazy.named_parameters():
        assert p.is_meta == name.startswith("model.layers."), name
    assert torch.equal(lazy.model.embed_tokens.weight, eager.model.embed_tokens.weight)
    assert torch.equal(lazy.lm_head.weight, eager.lm_head.weight)


def test_a_materialized_block_equals_the_eager_block_and_is_released(lazy, eager):
    layer = lazy.model.layers[1]
    with materialized(lazy, 1, [layer]):
        got = layer.state_dict()
        for key, value in eager.model.layers[1].state_dict().items():
            assert torch.equal(got[key], value), key
    assert all(p.is_meta for p in layer.parameters())


def test_half_precision_loads_in_the_asked_dtype(folder):
    model = load_model(str(folder), dtype="float16", device="cpu", lazy=True).model
    with materialized(model, 0, [model.model.layers[0]]) as (layer,):
        assert {p.dtype for p in layer.parameters()} == {torch.float16}
    assert model.model.embed_tokens.weight.dtype == torch.float16


@pytest.mark.parametrize("overrides", [{}, {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                                         "num_attention_heads": 8, "num_key_value_heads": 8}])
def test_blockwise_perplexity_equals_the_plain_forward(overrides, tiny_tokens):
    model = tiny_llama(1, vocab_size=256, **overrides)
    plain = perplexity(model, tiny_tokens, device=CPU, batch_size=2, progress=False)
    blockwise = perplexity_blockwise(model, tiny_tokens, device=CPU, batch_size=3, progress=False)
    assert blockwise == pytest.approx(plain, rel=1e-4)
    assert all(not p.is_meta for p in model.parameters())  # an eager model is left whole


def test_lazy_perplexity_equals_eager(lazy, eager, tiny_tokens):
    expected = perplexity(eager, tiny_tokens, device=CPU, progress=False)
    assert perplexity_blockwise(lazy, tiny_tokens, device=CPU, progress=False) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("method,options", [("rtn", {}), ("smoothquant", {}), ("omniquant", {"epochs": 1}),
                                            ("qllm", {"epochs": 1, "grid_steps": 4}),
                                            ("qllm", {"epochs": 1, "grid_steps": 4, "low_memory": True}),
                                            ("gptq", {"true_sequential": True}), ("smoothquant", {"weight_solver": "gptq"})])
def test_methods_on_a_lazy_model_match_the_eager_model(method, options, folder, lazy, eager, tiny_tokens, tmp_path):
    spec = BitSpec.parse("W4A8")
    m = get_method(method).from_options(options)
    block_store(lazy).set_work_dir(tmp_path / "blocks")
    m.quantize(eager, spec, tiny_tokens, CTX)
    m.quantize(lazy, spec, tiny_tokens, CTX)
    # every block was written once and released: nothing of the decoder stays in memory
    assert sorted(p.name for p in (tmp_path / "blocks").glob("block_*.safetensors")) == [f"block_{i:04d}.safetensors" for i in range(3)]
    assert all(p.is_meta for p in lazy.model.layers.parameters())
    with torch.no_grad():  # the quantization did something
        fp = load_model(str(folder), dtype="float32", device="cpu").model
        assert not torch.allclose(eager(tiny_tokens).logits, fp(tiny_tokens).logits, rtol=0, atol=1e-4)
    expected = perplexity(eager, tiny_tokens, device=CPU, progress=False)
    assert perplexity_blockwise(lazy, tiny_tokens, device=CPU, progress=False) == pytest.approx(expected, rel=1e-4)


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory, smollm2_tokenizer):
    """As ``folder``, with the head tied to the embedding (smollm2's and the scale benchmark's layout)."""
    path = tmp_path_factory.mktemp("lazy-tied") / "model"
    model = tiny_llama(0, num_hidden_layers=3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path, max_shard_size="2MB")
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_embedding_and_head_are_released_while_blocks_run_and_read_back_equal(tied, dtype, folder, tied_folder):
    model = load_model(str(tied_folder if tied else folder), dtype=dtype, device="cpu", lazy=True).model
    before = model.model.embed_tokens.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    with embedding_and_head_offloaded(model):
        assert model.model.embed_tokens.weight.is_meta and model.lm_head.weight.is_meta
    assert torch.equal(model.model.embed_tokens.weight, before) and torch.equal(model.lm_head.weight, head)
    assert model.lm_head.weight.dtype == getattr(torch, dtype)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    eager = load_model(str(folder), dtype="float32", device="cpu").model  # an eager model keeps its embedding
    with embedding_and_head_offloaded(eager):
        assert not eager.model.embed_tokens.weight.is_meta


def test_a_weight_changed_before_the_blocks_is_not_released(lazy):
    """Its only copy is in memory (a method folded something into it): reading the shard would undo that."""
    with torch.no_grad():
        lazy.model.embed_tokens.weight[7].mul_(2)  # one row differs from the shard
    changed = lazy.model.embed_tokens.weight.detach().clone()
    with embedding_and_head_offloaded(lazy):
        assert not lazy.model.embed_tokens.weight.is_meta
        assert lazy.lm_head.weight.is_meta  # the unchanged head still goes
    assert torch.equal(lazy.model.embed_tokens.weight, changed)


def test_qllm_on_a_lazy_tied_model_matches_the_eager_model(tied_folder, tiny_tokens, tmp_path):
    """QLLM folds its final-norm bias into the head after the blocks: with a tied head that needs the
    embedding back, and the same weight object in both places."""
    spec, options = BitSpec.parse("W4A8"), {"epochs": 1, "grid_steps": 4}
    eager = load_model(str(tied_folder), dtype="float32", device="cpu").model
    lazy = load_model(str(tied_folder), dtype="float32", device="cpu", lazy=True).model
    block_store(lazy).set_work_dir(tmp_path / "blocks")
    get_method("qllm").from_options(options).quantize(eager, spec, tiny_tokens, CTX)
    get_method("qllm").from_options(options).quantize(lazy, spec, tiny_tokens, CTX)
    assert lazy.lm_head.bias is not None and torch.equal(lazy.lm_head.bias, eager.lm_head.bias)
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight
    expected = perplexity(eager, tiny_tokens, device=CPU, progress=False)
    assert perplexity_blockwise(lazy, tiny_tokens, device=CPU, progress=False) == pytest.approx(expected, rel=1e-4)


def test_execute_on_a_folder_runs_lazily_and_leaves_its_work_dir_to_the_caller(folder, tmp_path):
    """execute writes the finished blocks and leaves them: only the caller knows when the result is stored."""
    from harness.evaluation.config import EvaluationConfig, PerplexityConfig
    from harness.run.execute import RunSpec, execute, work_dir
    from harness.run.workdir import discard
    from methods.rtn import RTNConfig

    evaluation = EvaluationConfig(ppl=PerplexityConfig(datasets=("brown",), seqlen=32, max_windows=2))
    run = RunSpec(str(folder), "rtn", RTNConfig(), BitSpec.parse("W4A8"), None, evaluation, device="cpu",
                  dtype="float32", work_root=str(tmp_path / "work"))
    kept = execute(run, progress=False)
    assert len(list((work_dir(run) / "blocks").glob("block_*.safetensors"))) == 3
    again = execute(run, progress=False)  # RTN keeps no checkpoint: an earlier attempt's blocks are redone
    assert again.metrics["ppl"]["brown"] == kept.metrics["ppl"]["brown"]
    assert discard(work_dir(run)) and not work_dir(run).exists()
    eager = copy.deepcopy(load_model(str(folder), dtype="float32", device="cpu").model)
    get_method("rtn").from_options({}).quantize(eager, BitSpec.parse("W4A8"), None, CTX)
    from harness.data.windows import eval_windows

    tokenizer = load_model(str(folder), dtype="float32", device="cpu").tokenizer
    windows = eval_windows("brown", tokenizer, 32, 2)
    assert kept.metrics["ppl"]["brown"] == pytest.approx(perplexity(eager, windows, device=CPU, progress=False), rel=1e-4)


def test_dispatch_on_cpu_gives_the_whole_model_for_lm_eval(lazy, eager, tiny_tokens):
    from harness.models.lazy import _mapped_device, dispatch

    model = dispatch(lazy, CPU)
    assert not is_lazy(model) and not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(tiny_tokens).logits, eager(tiny_tokens).logits)
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "": "cpu"}
    assert _mapped_device(device_map, "model.layers.0") == 0
    assert _mapped_device(device_map, "model.layers.1.mlp") == "cpu"
    assert _mapped_device(device_map, "lm_head") == "cpu"
    assert _mapped_device(None, "model.layers.0") is None


@pytest.mark.parametrize("solver", ["rtn", "gptq"])
def test_quarot_on_a_lazy_tied_model_matches_the_eager_model(tied_folder, tiny_tokens, tmp_path, solver):
    """The rotation unties the head and rotates embedding and head before the blocks; the lazy model keeps both
    (they exist nowhere else) and its finished blocks carry their online transforms and K-cache rotation."""
    spec = BitSpec.parse("W4A4KV4")
    eager = load_model(str(tied_folder), dtype="float32", device="cpu").model
    lazy = load_model(str(tied_folder), dtype="float32", device="cpu", lazy=True).model
    block_store(lazy).set_work_dir(tmp_path / "blocks")
    for model in (eager, lazy):
        get_method("quarot").from_options({"weight_solver": solver}).quantize(model, spec, tiny_tokens, CTX)
    assert lazy.lm_head.weight is not lazy.model.embed_tokens.weight and not lazy.lm_head.weight.is_meta
    torch.testing.assert_close(lazy.model.embed_tokens.weight, eager.model.embed_tokens.weight, rtol=0, atol=0)
    expected = perplexity(eager, tiny_tokens, device=CPU, progress=False)
    assert perplexity_blockwise(lazy, tiny_tokens, device=CPU, progress=False) == pytest.approx(expected, rel=1e-4)
