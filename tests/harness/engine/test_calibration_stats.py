"""harness.engine.calibration_stats: running per-channel abs-max of module inputs, checked against a direct computation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.engine.calibration_stats import input_abs_max, max_over_median, recording_inputs, smoothing_scales


def _inputs_of(model: nn.Module, name: str, tokens: torch.Tensor) -> torch.Tensor:
    """Every input the module ``name`` sees over ``tokens`` (all at once), via an independent hook."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    with torch.no_grad():
        for row in tokens:
            model(row[None], use_cache=False)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def test_input_abs_max_equals_max_over_all_tokens(tiny_model, tiny_tokens):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    stats = input_abs_max(tiny_model, tiny_tokens, names, device=torch.device("cpu"), batch_size=3, progress=False)
    assert list(stats) == names
    for name in names:
        expected = _inputs_of(tiny_model, name, tiny_tokens).abs().amax(dim=0)
        assert stats[name].dtype == torch.float32 and stats[name].device.type == "cpu"
        torch.testing.assert_close(stats[name], expected)
    # Inputs of different modules differ (down_proj is 128 wide, q_proj 64).
    assert stats[names[1]].shape == (tiny_model.config.intermediate_size,)


def test_running_max_does_not_depend_on_batching(tiny_model, tiny_tokens):
    name = "model.layers.1.mlp.gate_proj"
    one = input_abs_max(tiny_model, tiny_tokens, [name], device=torch.device("cpu"), batch_size=1, progress=False)
    all_ = input_abs_max(tiny_model, tiny_tokens, [name], device=torch.device("cpu"), batch_size=len(tiny_tokens), progress=False)
    torch.testing.assert_close(one[name], all_[name])


def test_hooks_are_removed(tiny_model, tiny_tokens):
    name = "model.layers.0.self_attn.q_proj"
    with recording_inputs(tiny_model, [name]) as record:
        with torch.no_grad():
            tiny_model(tiny_tokens[:1], use_cache=False)
    first = record.abs_max[name].clone()
    with torch.no_grad():
        tiny_model(tiny_tokens[1:] * 0 + 7, use_cache=False)  # would change the max if still hooked
    torch.testing.assert_close(record.abs_max[name], first)
    assert not tiny_model.get_submodule(name)._forward_pre_hooks


def test_module_that_never_runs_is_an_error(tiny_model, tiny_tokens):
    tiny_model.model.layers[1].mlp.extra = nn.Linear(4, 4)  # registered but never called
    with pytest.raises(ValueError, match="never ran"):
        input_abs_max(tiny_model, tiny_tokens, ["model.layers.1.mlp.extra"], device=torch.device("cpu"), progress=False)


def test_max_over_median():
    assert max_over_median(torch.tensor([1.0, 2.0, 2.0, 2.0, 50.0])) == pytest.approx(25.0)
    assert max_over_median(torch.ones(8)) == pytest.approx(1.0)


def test_recording_keeps_the_first_samples(tiny_model, tiny_tokens):
    name = "model.layers.0.mlp.down_proj"
    with recording_inputs(tiny_model, [name], keep_samples=3) as record, torch.no_grad():
        for row in tiny_tokens:  # one sample per forward: the record must stop at three
            tiny_model(row[None], use_cache=False)
    kept = record.first_samples(name)
    expected = _inputs_of(tiny_model, name, tiny_tokens[:3]).view(3, tiny_tokens.shape[1], -1)
    assert kept.shape == expected.shape
    torch.testing.assert_close(kept, expected)


def test_smoothing_scales_formula_and_official_clamps():
    act = torch.tensor([4.0, 0.0, 9.0])
    w1 = torch.tensor([[1.0, 0.0, -3.0]])
    w2 = torch.tensor([[-2.0, 0.0, 1.0]])  # max|W| over both consumers: [2, 0 -> 1e-5, 3]
    s = smoothing_scales(act, [w1, w2], alpha=0.5)
    expected = torch.tensor([4.0**0.5 / 2.0**0.5, 1e-5, 9.0**0.5 / 3.0**0.5])  # the zero channel is clamped to 1e-5
    torch.testing.assert_close(s, expected)
    assert smoothing_scales(act, [w1, w2], alpha=1.0)[0].item() == pytest.approx(4.0)  # alpha 1: all range to the weights
