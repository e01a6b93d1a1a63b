"""SpinQuant on the tiny random LLaMA (GQA 4/2 heads, vocabulary 256), sharpened so that 4-bit activations cost it
loss (outlier channels at every norm, the head's logits scaled up) and scored on windows it sampled itself:

- learned (non-identity, moved by training) rotations folded at W16A16 leave the FP function unchanged;
- the loss training sees at a rotation is the loss of the model deployed with that rotation;
- a few Cayley steps at W16A4KV4 lower the training loss, and the curve lands in the run's stats;
- R2 rotates what the V quantizer sees, and learning R2 goes through it;
- a W4A4KV4 one-run sweep stores a result; the dry-run estimate holds the whole model and a batch's activations;
- a width without a Hadamard matrix is rotated by QuaRot's R_K ⊗ H_m, exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from harness import BitSpec, QuantContext, get_method
from harness.data.config import CalibrationConfig
from harness.engine.memory import estimate
from harness.engine.solvers import SolverOptions
from harness.evaluation.config import EvaluationConfig, PerplexityConfig
from harness.models import tiny_llama
from harness.quant.attention import ATTRIBUTE
from harness.quant.hadamard import random_hadamard
from harness.quant.qlinear import quantizers_disabled
from harness.quant.rotation import KroneckerRotation, random_orthogonal
from harness.run.config import parse_config
from harness.run.execute import RunSpec, execute, plan
from harness.run.results import ResultStore
from harness.scheme import effective_spec
from methods.quarot import QuaRotConfig
from methods.spinquant import Rotations, SpinQuantConfig, apply_rotations, initial_rotations, learn_rotations

CTX = QuantContext(device=torch.device("cpu"), seed=0, progress=False)


def spec(bits: str) -> BitSpec:
    return effective_spec(get_method("spinquant"), bits)


def sharp_model() -> torch.nn.Module:
    model = tiny_llama(seed=0, vocab_size=256)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40.0
            layer.post_attention_layernorm.weight[[5]] *= 25.0
        model.model.norm.weight.mul_(25.0)
    return model


def own_samples(model: torch.nn.Module, windows: int, length: int) -> torch.Tensor:
    """Windows the model samples itself: its FP loss on them is low, so quantization error shows."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (windows, 1), generator=g)
    with torch.no_grad():
        for _ in range(length - 1):
            ids = torch.cat([ids, torch.multinomial(model(ids).logits[:, -1].softmax(-1), 1, generator=g)], 1)
    return ids


def loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def test_learned_rotations_leave_the_fp_function_unchanged():
    model = sharp_model()
    ids = own_samples(model, 4, 32)
    learned = learn_rotations(copy.deepcopy(model), ids, spec("W16A4KV4"), SpinQuantConfig(steps=3, batch_size=4), CTX)
    start = initial_rotations("hadamard", 64, 16, 2, seed=0)
    for r, r0 in zip((learned.r1, *learned.r2), (start.r1, *start.r2)):
        assert (r - r0).abs().max() > 1e-3  # training moved it
        assert (r - torch.eye(len(r), dtype=r.dtype)).abs().max() > 0.1
    model = model.double()  # float32 values: the engine's float32 blocks hold them exactly
    with torch.no_grad():
        reference = model(ids).logits
        apply_rotations(model, spec("W16A16"), learned, SolverOptions("rtn"), ids, CTX)
        error = ((model(ids).logits - reference).norm() / reference.norm()).item()
    assert error < 1e-5
    assert not torch.allclose(model.model.embed_tokens.weight.float(), sharp_model().model.embed_tokens.weight, atol=1e-3)


def test_the_training_loss_is_the_loss_of_the_model_deployed_with_that_rotation():
    model = sharp_model()
    ids = own_samples(model, 4, 32)
    at = spec("W16A4KV4")
    trained = learn_rotations(copy.deepcopy(model), ids, at, SpinQuantConfig(steps=1, batch_size=4), CTX)
    apply_rotations(model, at, initial_rotations("hadamard", 64, 16, 2, seed=0), SolverOptions("rtn"), ids, CTX)
    assert trained.losses[0] == pytest.approx(loss(model, ids), rel=1e-5)  # the first step's loss is at the start
    assert loss(model, ids) > loss(sharp_model(), ids) + 0.05  # and 4 bits cost loss


def test_a_few_steps_lower_the_quantized_loss_and_the_curve_is_recorded():
    model = sharp_model()
    ids = own_samples(model, 8, 64)
    result = get_method("spinquant").from_options({"steps": 20, "weight_solver": "rtn"}).apply(model, spec("W16A4KV4"), ids, CTX)
    curve = result.stats["loss_curve"]
    assert len(curve) == result.stats["steps"] == 20 and result.stats["trained_at"] == "W16A4KV4"
    assert sum(curve[-5:]) / 5 < curve[0] - 0.02
    assert result.stats["orthogonality_error"] < 1e-12


def test_zero_steps_deploy_the_starting_rotations():
    model = sharp_model()
    ids = own_samples(model, 2, 16)
    by_hand = copy.deepcopy(model)
    method = get_method("spinquant").from_options({"steps": 0, "weight_solver": "rtn"})
    result = method.apply(model, spec("W4A4KV4"), ids, CTX)
    start = initial_rotations("hadamard", 64, 16, 2, seed=0)
    apply_rotations(by_hand, spec("W4A4KV4"), start, method.solver_options(), ids, CTX)  # RTN with the clip search
    assert result.stats["loss_curve"] == [] and result.stats["steps"] == 0
    for (name, a), b in zip(model.state_dict().items(), by_hand.state_dict().values()):
        assert torch.equal(a, b), name


def test_r2_rotates_what_the_v_quantizer_sees():
    model = tiny_llama(seed=0, vocab_size=256)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    plain = []
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda _m, _a, out: plain.append(out)) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    rotations = Rotations(random_orthogonal(64, 1), [random_orthogonal(16, 2), random_orthogonal(16, 3)], [])
    apply_rotations(model, spec("W16A16KV4"), rotations, SolverOptions("rtn"), ids, CTX)
    seen = []
    for layer in model.model.layers:
        getattr(layer.self_attn, ATTRIBUTE).v.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad(), quantizers_disabled(model):  # no block's K/V rounded before the next block's V
        model(ids)
    assert len(seen) == 2
    for v, r2, quantized in zip(plain, rotations.r2, seen):
        expected = v.double().view(2, 24, 2, 16).transpose(1, 2) @ r2  # (batch, kv heads, seqlen, head_dim)
        torch.testing.assert_close(quantized.double(), expected, rtol=0, atol=1e-5)


def test_learning_r2_goes_through_the_v_quantizer():
    """With K and V quantized (and K in R3's basis, which R2 does not touch) R2 moves; with nothing quantized the
    loss does not depend on R2, so it stays where it started."""
    model = sharp_model()
    ids = own_samples(model, 4, 32)
    start = initial_rotations("hadamard", 64, 16, 2, seed=0).r2
    moved = {}
    for bits in ("W16A16KV4", "W16A16"):
        learned = learn_rotations(copy.deepcopy(model), ids, spec(bits), SpinQuantConfig(steps=1, batch_size=4), CTX)
        moved[bits] = max((r - r0).abs().max().item() for r, r0 in zip(learned.r2, start))
    assert moved["W16A16KV4"] > 1e-3 and moved["W16A16"] < 1e-6


def test_a_w4a4kv4_sweep_stores_a_result_with_the_loss_curve(tmp_path):
    raw = {"name": "spinquant", "models": ["tiny-random-llama"], "methods": [{"name": "spinquant", "steps": 2}],
           "bits": ["W4A4KV4"], "device": "cpu", "calibration": {"dataset": "brown", "samples": 2, "seqlen": 32},
           "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 32, "max_windows": 2}}}
    [run] = [r for r in plan(parse_config(raw)) if r.method == "spinquant"]
    store = ResultStore(tmp_path)
    store.write(run.key, execute(run, progress=False))
    [record] = list(store.records())
    assert record.bits == "W4A4KV4" and math.isfinite(record.metrics["ppl"]["brown"])
    assert len(record.stats["loss_curve"]) == 2 and record.stats["trained_at"] == "W16A4KV4"


def test_the_estimate_holds_the_whole_model_and_a_batch_of_activations():
    config = LlamaConfig(num_hidden_layers=8, vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    evaluation = EvaluationConfig(ppl=PerplexityConfig(datasets=("brown",), seqlen=256, max_windows=2))
    quarot = RunSpec("tiny-random-llama", "quarot", QuaRotConfig(), BitSpec.parse("W4A4"),
                     CalibrationConfig("brown", 16, 256), evaluation, device="cpu", dtype="float32")
    spin = dataclasses.replace(quarot, method="spinquant", config=SpinQuantConfig())
    block = 4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024
    extra = estimate(spin, config).host_bytes - estimate(quarot, config).host_bytes
    # the other 7 blocks as loaded and in float32, and 8 windows' logits with their gradient
    assert extra > 7 * block * 8 + 8 * 256 * 32000 * 4 * 2
    longer = dataclasses.replace(spin, calibration=CalibrationConfig("brown", 16, 512))
    per_token = SpinQuantConfig().batch_size * 4 * (8 * 1024 + 3 * 32000)
    assert estimate(longer, config).host_bytes - estimate(spin, config).host_bytes > 256 * per_token


def test_initial_rotations_draw_quarots_residual_rotation_first():
    start = initial_rotations("hadamard", 64, 16, 3, seed=5)
    torch.testing.assert_close(start.r1, random_hadamard(64, 5), rtol=0, atol=0)
    assert len({tuple(r.diagonal().tolist()) for r in start.r2}) == 3  # each block its own signs
    for r in (start.r1, *start.r2, *initial_rotations("random", 64, 16, 3, seed=5).r2):
        torch.testing.assert_close(r @ r.T, torch.eye(len(r), dtype=r.dtype), rtol=0, atol=1e-12)


def test_a_width_without_a_hadamard_matrix_gets_the_kronecker_rotation():
    model = tiny_llama(seed=0, vocab_size=256, intermediate_size=11 * 16).double()  # MLP 176 = R_11 ⊗ H_16
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    get_method("spinquant").from_options({"steps": 2, "weight_solver": "rtn"}).apply(model, spec("W16A16"), ids, CTX)
    with torch.no_grad():
        error = ((model(ids).logits - reference).norm() / reference.norm()).item()
    assert error < 1e-5
    assert isinstance(model.model.layers[0].mlp.down_proj.input_transform, KroneckerRotation)
