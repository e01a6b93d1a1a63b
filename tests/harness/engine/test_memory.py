"""harness.engine.memory: the dry-run estimate's invariants and the up-front refusal."""
from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner
from transformers import LlamaConfig

from harness import BitSpec
from harness.cli import main
from harness.engine.memory import RUNTIME_BYTES, check_fits, estimate
from harness.errors import ResourceUnavailableError
from harness.data.config import CalibrationConfig
from harness.evaluation.config import EvaluationConfig, PerplexityConfig
from harness.method import WorkingMemory
from harness.run.execute import RunSpec
from methods.omniquant import OmniQuantConfig

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8,
              tie_word_embeddings=False)


def spec(samples: int = 16, seqlen: int = 256, device: str = "cpu") -> RunSpec:
    evaluation = EvaluationConfig(ppl=PerplexityConfig(datasets=("brown",), seqlen=seqlen, max_windows=2))
    return RunSpec("tiny-random-llama", "omniquant", OmniQuantConfig(), BitSpec.parse("W4A4"),
                   CalibrationConfig("brown", samples, seqlen), evaluation, device=device, dtype="float16")


def test_estimate_does_not_grow_with_depth():
    shallow = estimate(spec(), LlamaConfig(num_hidden_layers=8, **CONFIG))
    deep = estimate(spec(), LlamaConfig(num_hidden_layers=80, **CONFIG))
    assert shallow == deep


def test_estimate_counts_the_calibration_buffers_and_the_eager_modules():
    config = LlamaConfig(num_hidden_layers=8, **CONFIG)
    small, big = estimate(spec(samples=16), config), estimate(spec(samples=64), config)
    # three fp16 (samples, seqlen, hidden) buffers per extra sample
    assert big.host_bytes - small.host_bytes == 3 * 48 * 256 * 1024 * 2
    # at least the runtime, an untied embedding + head in fp16, and one fp16 block
    block = 4 * 1024 * 1024 + 3 * 1024 * 2816
    assert small.host_bytes > RUNTIME_BYTES + 2 * 32000 * 1024 * 2 + block * 2
    assert small.device_bytes == 0  # a CPU run: the device is the host


BLOCK = 4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024  # attention (no GQA), MLP, two norms


@pytest.mark.parametrize("own, added", [
    (WorkingMemory(weight_copies=2.5), 2.5 * BLOCK * 4),  # float32 copies of the block group
    (WorkingMemory(blocks_per_job=3), 2 * BLOCK * (2 + 4)),  # two more blocks, as loaded (fp16) and in float32
    (WorkingMemory(blocks_per_job=2, weight_copies=1.0), BLOCK * (2 + 4 + 4 + 4)),  # the copies are of the group
    (WorkingMemory(extra_bytes=12345), 12345),
    (WorkingMemory(samples=4), 4 * 256 * (2 * 1024 + 2816) * 4),  # the linears' float32 inputs of 4 windows
    (WorkingMemory(samples=None), 16 * 256 * (2 * 1024 + 2816) * 4),  # ... of every calibration window
    (WorkingMemory(samples=100), 16 * 256 * (2 * 1024 + 2816) * 4),  # never more than the run has
    (WorkingMemory(token_bytes=1000), 1000 * 256),  # per token of the calibration windows (seqlen 256)
])
def test_what_a_method_says_it_holds_adds_to_the_estimate(monkeypatch, own, added):
    from methods.omniquant import OmniQuant

    config = LlamaConfig(num_hidden_layers=8, **CONFIG)
    monkeypatch.setattr(OmniQuant, "working_memory", lambda self, config: WorkingMemory())
    without = estimate(spec(), config)
    monkeypatch.setattr(OmniQuant, "working_memory", lambda self, config: own)
    assert estimate(spec(), config).host_bytes - without.host_bytes == added


@pytest.mark.parametrize("method, options, saved", [
    ("omniquant", {"low_memory": True}, 0.5),
    ("qllm", {"low_memory": True, "blocks_per_job": 2}, 0.75),
])
def test_low_memory_lowers_the_estimate_by_the_copies_it_drops(method, options, saved):
    from harness.registry import get_method

    config = LlamaConfig(num_hidden_layers=8, **CONFIG)
    cls = get_method(method)
    default = {k: v for k, v in options.items() if k != "low_memory"}
    runs = [dataclasses.replace(spec(), method=method, config=cls.config_class.from_dict(o)) for o in (default, options)]
    plain, low = (estimate(r, config).host_bytes for r in runs)
    assert plain - low == saved * BLOCK * 4 * options.get("blocks_per_job", 1)


def test_run_that_does_not_fit_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr("harness.engine.memory.available", lambda device: (10 * 2**20, None))
    with pytest.raises(ResourceUnavailableError, match=r"needs about .* GB of host memory, 0\.0 GB available") as err:
        check_fits(spec())
    assert "\n" not in str(err.value)
    monkeypatch.setattr("harness.engine.memory.available", lambda device: (2**50, None))
    assert check_fits(dataclasses.replace(spec())) is not None


def test_dry_run_prints_the_estimate(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("models: [tiny-random-llama]\nmethods: [rtn]\nbits: [W4A4]\ndevice: cpu\n")
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.count("host ") == 2 and " GB" in result.output


def test_a_moe_block_counts_every_expert_and_the_router(monkeypatch):
    from transformers import Qwen3MoeConfig

    from methods.omniquant import OmniQuant

    monkeypatch.setattr(OmniQuant, "working_memory", lambda self, config: WorkingMemory())
    moe = dict(CONFIG, moe_intermediate_size=704, num_experts_per_tok=2, num_hidden_layers=8)
    few, many = (estimate(spec(), Qwen3MoeConfig(num_experts=n, **moe)) for n in (4, 8))
    # four more experts' gate/up/down (of the expert width, not intermediate_size) and router rows, fp16 and float32
    assert many.host_bytes - few.host_bytes == 4 * (3 * 1024 * 704 + 1024) * (2 + 4)
