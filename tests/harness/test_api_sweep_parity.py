"""``ptqbench.quantize`` and a one-run sweep give one model: for every registered method, the same model, bits,
options, seed and calibration windows give bit-identical weights, and ``ptqbench.perplexity`` the sweep's ``ppl``.

The parametrisation reads the registry, so a method registered later (a plugin) is covered without editing
this file. W4A4 exercises the scheme the sweep applies beyond the short string: ``attention: auto`` (Q/K/V
quantized) and each method's ``quant_defaults`` (QuaRot's symmetric grid and clip ratios).
"""
from __future__ import annotations

import pytest
import torch

from harness.registry import REGISTRY
from tests.conftest import fast_options

SEED = 1  # not 0: a route that ignored the seed would still pass at the default
METHODS = sorted(n for n in REGISTRY.names() if not REGISTRY.get(n).is_baseline)  # a baseline quantizes nothing


def sweep_model(name: str, bits: str, options: dict, monkeypatch) -> tuple[torch.nn.Module, float]:
    """The model a sweep's run evaluates (captured at evaluation) and the perplexity it records."""
    import harness.run.execute as execute_module
    from harness.run.config import parse_config

    config = parse_config({
        "models": ["tiny-random-llama"], "methods": [{"name": name, **options}], "bits": [bits], "seed": SEED,
        "calibration": {"dataset": "brown", "samples": 4, "seqlen": 32},
        "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 32, "max_windows": 2}},
    })
    (run,) = [r for r in execute_module.plan(config) if r.method == name]
    seen = {}
    real = execute_module.evaluate_model

    def capture(model, *args, **kwargs):
        seen["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(execute_module, "evaluate_model", capture)
    record = execute_module.execute(run, progress=False)
    return seen["model"], record.metrics["ppl"]["brown"]


@pytest.mark.parametrize("bits", ["W4A4", "W4A16"])
@pytest.mark.parametrize("name", METHODS)
def test_the_api_and_a_sweep_give_the_same_weights_and_perplexity(name, bits, monkeypatch):
    import ptqbench
    from harness.errors import ConfigError

    options = fast_options(name)
    try:
        swept, swept_ppl = sweep_model(name, bits, options, monkeypatch)
    except ConfigError as err:  # a method that refuses this spec refuses it on both routes, in one line
        with pytest.raises(ConfigError):
            loaded = ptqbench.load_model("tiny-random-llama", seed=SEED)
            ptqbench.quantize(loaded.model, name, bits, "brown", tokenizer=loaded.tokenizer, samples=4, seqlen=32,
                              seed=SEED, progress=False, **options)
        assert "\n" not in str(err)
        return
    loaded = ptqbench.load_model("tiny-random-llama", seed=SEED)
    model = ptqbench.quantize(loaded.model, name, bits, "brown", tokenizer=loaded.tokenizer, samples=4, seqlen=32, seed=SEED,
                              progress=False, **options)
    ours, theirs = model.state_dict(), swept.state_dict()
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert different == []
    assert ptqbench.perplexity(model, loaded.tokenizer, "brown", seqlen=32, max_windows=2, progress=False) == swept_ppl


def test_the_api_applies_the_methods_quant_defaults_and_the_sweeps_attention_setting():
    from harness.registry import get_method
    from harness.scheme import effective_spec

    quarot = effective_spec(get_method("quarot"), "W4A4KV4")
    assert (quarot.a_symmetric, quarot.full_grid, quarot.a_clip, quarot.kv_clip, quarot.kv_sym) == (True, True, 0.9, 0.95, False)
    assert not quarot.attention and quarot.quantizes_kv  # its paper: Q FP, K/V at the KV bits
    rtn = effective_spec(get_method("rtn"), "W4A4")
    assert rtn.attention and not rtn.a_symmetric  # attention: auto quantizes Q/K/V with the activations
    # the caller's quant: wins over the method's defaults, as a sweep's quant: section does
    assert effective_spec(get_method("quarot"), "W4A4", {"act_clip_ratio": 1.0}).a_clip == 1.0
    assert not effective_spec(get_method("rtn"), "W4A4", {"attention": False}).attention
