"""Every registered method on every model family the adapter describes (``harness.models.TINY_FAMILY_CONFIGS``):

1. its equivalent transforms leave the FP function unchanged: the method at a spec where its transforms act
   but nothing is rounded (W16A16), or, for a method that rounds whatever the spec (AWQ, OS+), its transform
   step alone on the engine. Models have norms away from their init and outlier channels, so every fold moves
   something; logits are compared in float64 (the engine computes blocks in float32: ~1e-7 relative);
2. at W4A4, a one-run sweep (``parse_config`` + ``plan`` + ``execute`` on ``tiny-random-<family>``) stores a
   finite result, or ``parse_config`` refuses the pair in one line that names the family.

A method that refuses a family (``Method.check_model``: OS+'s and QLLM's reassembly on a MoE) does so in one line
naming it, in 1. as in 2.

A family added to ``TINY_FAMILY_CONFIGS`` and a method added to the registry are picked up here.
"""
from __future__ import annotations

import math

import ptqbench
import pytest
import torch

from harness import BitSpec, ConfigError, QuantContext
from harness.adapter import get_adapter
from harness.engine.blockwise import run_blockwise
from harness.engine.hooks import BlockHooks
from harness.models import TINY_FAMILY_CONFIGS, tiny_model, tiny_name
from harness.registry import REGISTRY
from harness.run.config import parse_config
from harness.run.execute import execute, plan
from harness.run.results import ResultStore
from methods.awq import auto_scale_block, recorded_inputs
from methods.osplus import OSPlusConfig, suppress
from tests.conftest import fast_options

FAMILIES = sorted(TINY_FAMILY_CONFIGS)
METHODS = sorted(name for name in REGISTRY.names() if not REGISTRY.get(name).is_baseline)
CPU = torch.device("cpu")
CTX = QuantContext(device=CPU, progress=False)
TOLERANCE = 1e-5  # relative logit error; a fold with the wrong algebra is off by 1e-2 or more


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 49152, (n, 40), generator=torch.Generator().manual_seed(seed))  # longer than the windows (16)


def outlier_model(family: str) -> torch.nn.Module:
    """A tiny model of ``family``, float64 with float32 values (the engine's float32 blocks hold them exactly), every
    norm's factor in [0.5, 1.5] and a few input channels of every block 20-40x the rest."""
    model = tiny_model(family, seed=1)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm"):
                scale = 0.5 + torch.rand(module.weight.shape, generator=g)
                adapter.set_norm_scale(module, scale)
        for layer in adapter.layers(model):
            for pair, channels, factor in ((adapter.attn_in, [3, 17], 40.0), (adapter.mlp_in, [5], 25.0)):
                norm = layer.get_submodule(pair.producer)
                scale = adapter.norm_scale(norm)
                scale[channels] *= factor
                adapter.set_norm_scale(norm, scale)
    return model.double()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def awq_scaling(model: torch.nn.Module, calibration: torch.Tensor) -> None:
    """AWQ's scale search and fold (``auto_scale_block``) on every block, no clipping, no rounding."""
    record, _ = recorded_inputs(get_adapter(model))

    def solve(job):
        for layer, inputs in zip(job.layers, job.inputs):
            auto_scale_block(job, layer, {name: inputs.first_samples(name) for name in record}, BitSpec.parse("W4A16"), 4)

    run_blockwise(model, calibration, BlockHooks(solve=solve, record=record, keep_samples=len(calibration)), device=CPU,
                  progress=False)


def osplus_migration(model: torch.nn.Module, calibration: torch.Tensor) -> None:
    """OS+'s threshold search against W4A4 and its migration on every block, leaving the linears FP."""
    suppress(model, calibration, BitSpec.parse("W4A4"), OSPlusConfig(min_steps=10, step_unit=100.0, search_samples=2), CTX,
             solver=None)


# methods that round whatever the spec: their transform step alone
TRANSFORM_STEPS = {"awq": awq_scaling, "os+": osplus_migration}
# options at W16A16 that make a method's transform act and leave out what is not a transform: QLLM's adaptive theta
# keeps a site unchanged when nothing is quantized, the channel budget's theta splits channels anyway; its assembly
# averages two channels (an approximation by design) and its corrections and final norm are trained
W16A16_OPTIONS = {"qllm": {"theta": "ratio", "assembly": False, "error_correction": False, "final_norm": "off"},
                  "quarot": {"weight_solver": "rtn"}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_transforms_leave_the_fp_function_unchanged(method, family):
    model = outlier_model(family)
    calibration, ids = tokens(2, 0), tokens(2, 1)
    reference = logits(model, ids)
    options = {**fast_options(method), **W16A16_OPTIONS.get(method, {})}
    try:
        REGISTRY.get(method).from_options(options).check_model(model.config)
    except ConfigError as err:  # a family the method cannot serve, refused before any work
        assert family in str(err) and "\n" not in str(err), str(err)
        return
    if method in TRANSFORM_STEPS:
        TRANSFORM_STEPS[method](model, calibration)
    else:
        try:
            ptqbench.quantize(model, method, "W16A16", calibration, device="cpu", progress=False, **options)
        except ConfigError as err:  # a method that only rounds (GPTQ) has nothing to run at 16 bits
            assert "W16A16" in str(err) and "\n" not in str(err)
            return
    error = ((logits(model, ids) - reference).norm() / reference.norm()).item()
    assert error < TOLERANCE, f"{method} on {family}: relative logit error {error:.2e}"


def test_the_transforms_act_on_the_models_above():
    """The exactness test is not vacuous: on the outlier models each transform changes the weights it folds into."""
    for family in FAMILIES:
        model = outlier_model(family)
        adapter = get_adapter(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        if adapter.refusal("mlp_site") is None:  # QLLM's reassembly refuses a MoE
            ptqbench.quantize(model, "qllm", "W16A16", tokens(2, 0), device="cpu", progress=False,
                              **fast_options("qllm"), **W16A16_OPTIONS["qllm"])
            widths = [layer.get_submodule(adapter.attn_in.consumers[0]).weight.shape[1] for layer in adapter.layers(model)]
            assert max(widths) > model.config.hidden_size, family  # channels disassembled, not merged back
            model = outlier_model(family)
        ptqbench.quantize(model, "smoothquant", "W16A16", tokens(2, 0), device="cpu", progress=False)
        params = dict(model.named_parameters())
        for name in (adapter.attn_in.producer, *adapter.routers):  # a MoE's router takes the scales of its input too
            key = f"{adapter.layers_path}.0.{name}.weight"
            assert not torch.equal(params[key], before[key]), (family, name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_w4a4_runs_through_a_sweep_or_is_refused_in_one_line(method, family, tmp_path):
    raw = {"name": "families", "models": [tiny_name(family)], "methods": [{"name": method, **fast_options(method)}],
           "bits": ["W4A4"], "device": "cpu", "calibration": {"dataset": "brown", "samples": 2, "seqlen": 32},
           "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 32, "max_windows": 2}}}
    try:
        config = parse_config(raw)
    except ConfigError as err:
        assert "\n" not in str(err) and family in str(err), str(err)
        return
    [run] = [r for r in plan(config) if r.method == method]
    store = ResultStore(tmp_path)
    store.write(run.key, execute(run, progress=False))
    [record] = list(store.records())
    assert record.method == method and record.model == tiny_name(family) and record.bits == "W4A4"
    assert math.isfinite(record.metrics["ppl"]["brown"])
