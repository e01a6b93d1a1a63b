"""flatquant: its transforms against dense computations, the block exact in FP after training, training lowering
the block's error with its loss curve recorded, the K transform where the K quantizer sees it, and a W4A4KV4
one-run sweep whose export reloads to the run's perplexity.

Every expected number comes from an independent computation (a dense ``torch.kron``, ``torch.linalg.inv``,
the FP block's own outputs, RoPE written out here) or from the run's own record; never from an earlier run.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import methods.flatquant.method as flat_method
from harness import BitSpec, QuantContext, get_method, quantizers_disabled
from harness.export.formats import MANIFEST
from harness.export.loader import load_quantized
from harness.models import tiny_llama
from harness.quant.online import online_transform
from harness.scheme import effective_spec
from methods.flatquant.transforms import (
    ClippedActQuantizer,
    InvertibleMatrix,
    KroneckerAffine,
    KroneckerTransform,
    decompose,
)

CPU = torch.device("cpu")
CTX = QuantContext(device=CPU, progress=False)
FLATQUANT = get_method("flatquant")


def spec(bits: str) -> BitSpec:
    return effective_spec(FLATQUANT, bits)  # the official scheme: symmetric, full grid, K/V asymmetric, Q FP


def outlier_model(layers: int = 1) -> torch.nn.Module:
    """Tiny LLaMA (4 heads, 2 KV heads) with a few large channels after the norms, like real LLM activations."""
    model = tiny_llama(seed=0, vocab_size=256, num_hidden_layers=layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 20.0
            layer.post_attention_layernorm.weight[[5]] *= 15.0
    return model


def tokens(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 32), generator=torch.Generator().manual_seed(seed))


def quantize(model, bits: str, **options):
    return FLATQUANT.from_options(options).quantize(model, spec(bits), tokens(), CTX)


# -- the transforms ----------------------------------------------------------------------------------------------


def test_decompose_is_the_closest_factor_pair_of_equal_parity():
    """The official get_decompose_dim: n = (a - b)(a + b) with the smallest a; brute force over factor pairs."""
    for n in range(1, 1200):
        pairs = [(p, n // p) for p in range(1, math.isqrt(n) + 1) if n % p == 0 and (p + n // p) % 2 == 0]
        if pairs:
            assert decompose(n) == min(pairs, key=sum), n
    assert decompose(576) == (24, 24) and decompose(1536) == (32, 48) and decompose(11008) == (86, 128)


def test_kronecker_affine_is_the_dense_kronecker_product_and_reloads_from_its_recipe():
    g = torch.Generator().manual_seed(0)
    a, b, x = torch.randn(3, 3, generator=g), torch.randn(5, 5, generator=g), torch.randn(2, 7, 15, generator=g)
    for left, right, dense in ((a, b, torch.kron(a, b)), (a, None, torch.kron(a, torch.eye(5))),
                               (None, b, torch.kron(torch.eye(3), b))):
        transform = KroneckerAffine(left, right)
        torch.testing.assert_close(transform(x), x @ dense, rtol=1e-5, atol=1e-5)
        rebuilt = online_transform(json.loads(json.dumps(transform.to_dict())))
        assert type(rebuilt) is KroneckerAffine and torch.equal(rebuilt(x), transform(x))
        assert transform.state_dict() == {}  # the recipe carries the factors


@pytest.mark.parametrize("form", ["svd", "inverse"])
def test_each_parametrisation_gives_the_inverse_transpose_and_an_exact_pair(form):
    m = InvertibleMatrix(6, form, seed=3)
    with torch.no_grad():  # away from the orthogonal start: the inverse is not the transpose any more
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    dense = m.matrix().double()
    assert not torch.allclose(dense @ dense.T, torch.eye(6, dtype=torch.float64), atol=1e-3)
    torch.testing.assert_close(m.inverse_t().double(), torch.linalg.inv(dense).T, rtol=1e-4, atol=1e-5)

    t = KroneckerTransform(12, form, seed=5, diag=torch.linspace(0.5, 2.0, 12))  # 12 = 2 x 6
    w, x = torch.randn(4, 12), torch.randn(3, 12)
    torch.testing.assert_close(t(x) @ t.weight_side(w).T, x @ w.T, rtol=1e-4, atol=1e-5)


def test_learned_activation_clip_freezes_into_the_same_quantizer():
    q = ClippedActQuantizer(4, symmetric=True, full_grid=True)
    with torch.no_grad():
        q.gamma.fill_(1.3), q.beta.fill_(0.4)
    x = torch.randn(5, 9, 32)
    frozen = q.frozen()
    assert (frozen.clip_ratio, frozen.clip_ratio_min) == pytest.approx((torch.sigmoid(torch.tensor(1.3)).item(),
                                                                        torch.sigmoid(torch.tensor(0.4)).item()))
    assert torch.equal(frozen(x), q(x))


# -- the method --------------------------------------------------------------------------------------------------


def test_trained_transforms_merge_into_a_block_that_computes_the_fp_function(monkeypatch):
    """W4A4KV4 trained (LWC off: it clips what is rounded): after the merge, with every quantizer off, the block
    gives the FP block's outputs, the merged and online halves together; the transforms moved in training."""
    seen = {}
    solve_block = flat_method.solve_block

    def checked(job, layer, bits, solver):
        with quantizers_disabled(layer):
            out = job.forward(job.rows(job.fp_inputs, slice(None)))
        target = job.rows(job.targets, slice(None))
        seen["error"] = ((out - target).norm() / target.norm()).item()
        seen["q"] = layer.get_submodule(job.adapter.qkv_names[0]).input_transform.left.clone()
        attn = layer.get_submodule(job.adapter.attention_path).qkv_quant
        seen["k"] = attn.k_transform.right.clone()
        return solve_block(job, layer, bits, solver)

    monkeypatch.setattr(flat_method, "solve_block", checked)
    quantize(outlier_model(), "W4A4KV4", epochs=3, lwc=False)
    trained = dict(seen)
    quantize(outlier_model(), "W4A4KV4", epochs=0, lwc=False)
    assert trained["error"] < 1e-5 and seen["error"] < 1e-5
    assert not torch.allclose(trained["q"], seen["q"], atol=1e-4) and not torch.allclose(trained["k"], seen["k"], atol=1e-4)


def test_a_few_epochs_lower_the_blocks_error_and_the_loss_curve_is_recorded():
    untrained = quantize(outlier_model(), "W4A4", epochs=0).stats["blocks"][0]
    result = quantize(outlier_model(), "W4A4", epochs=6)
    block = result.stats["blocks"][0]
    assert untrained["epoch_losses"] == []
    assert block["output_mse"] < 0.85 * untrained["output_mse"]
    assert len(block["epoch_losses"]) == 6 and all(math.isfinite(x) for x in block["epoch_losses"])
    assert block["epoch_losses"][-1] < block["epoch_losses"][0]
    assert result.stats["epochs"] == 6 and result.stats["samples"] == 8


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of the rotate-half layout, written out: channels d and d + head_dim / 2 of a head turn together."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def test_the_k_quantizer_sees_k_after_rope_times_pk_and_q_times_its_inverse_transpose():
    model = quantize(outlier_model(), "W4A4KV4", epochs=1).model
    attn = model.model.layers[0].self_attn
    quantizer = attn.qkv_quant
    pk = quantizer.k_transform.right.double()
    assert quantizer.k.enabled and not quantizer.q.enabled  # K cache at 4 bits, Q FP (the official q_bits 16)
    assert not torch.allclose(pk @ pk.T, torch.eye(pk.shape[0], dtype=torch.float64), atol=1e-3)  # not a rotation
    captured = {}
    hooks = [attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k_proj", o)),
             attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q_proj", o)),
             quantizer.k.register_forward_pre_hook(lambda m, i: captured.__setitem__("k_quant", i[0])),
             quantizer.q.register_forward_pre_hook(lambda m, i: captured.__setitem__("q_quant", i[0]))]
    ids = tokens(2, seed=5)
    with torch.no_grad():
        model(ids, use_cache=False)
        hidden = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
    for h in hooks:
        h.remove()
    head_dim = pk.shape[0]
    for name, matrix in (("k", pk), ("q", torch.linalg.inv(pk).T)):
        projected = captured[f"{name}_proj"]
        heads = projected.view(*projected.shape[:2], -1, head_dim).transpose(1, 2).double()
        expected = rope(heads, cos[:, None].double(), sin[:, None].double()) @ matrix
        torch.testing.assert_close(captured[f"{name}_quant"].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_w4a4kv4_sweep_stores_its_result_and_its_export_reloads_to_the_runs_perplexity(tmp_path):
    import dataclasses

    from transformers import AutoTokenizer

    from harness.evaluation.evaluate import evaluate_model
    from harness.run.config import parse_config
    from harness.run.execute import execute, plan, quantized_dir
    from harness.run.results import ResultStore

    raw = {"name": "flatquant", "device": "cpu", "models": ["tiny-random-llama"], "bits": ["W4A4KV4"],
           "methods": [{"name": "flatquant", "epochs": 2}], "keep_quantized": True,
           "calibration": {"samples": 4, "seqlen": 64},
           "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 64, "max_windows": 2}}}
    (run,) = [r for r in plan(parse_config(raw)) if r.method == "flatquant"]
    run = dataclasses.replace(run, work_root=str(tmp_path / "work"), quantized_root=str(tmp_path / "quantized"))
    record = execute(run, progress=False)
    store = ResultStore(tmp_path / "out")
    store.write(run.key, record)
    (stored,) = store.records()
    assert stored.method == "flatquant" and stored.bits == "W4A4KV4" and math.isfinite(stored.ppl["brown"])
    losses = [block["epoch_losses"] for block in stored.stats["blocks"]]
    assert len(losses) == 2 and all(len(curve) == 2 for curve in losses)

    folder = quantized_dir(run)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert {e["input_transform"]["kind"] for e in manifest["linears"].values()} == {"kronecker_affine"}
    assert all("act_clip" in e for e in manifest["linears"].values())
    assert all(e["k_transform"]["kind"] == "kronecker_affine" for e in manifest["attention"].values())
    model = load_quantized(folder)
    metrics = evaluate_model(model, AutoTokenizer.from_pretrained(folder), run.evaluation, device=CPU, progress=False)
    assert metrics["ppl"]["brown"] == pytest.approx(record.ppl["brown"], rel=1e-6, abs=0)


def test_gptq_rounds_the_merged_weights_and_keeps_the_online_transforms_and_clips():
    """weight_solver: gptq (official --gptq): every linear ends frozen on the 4-bit grid of its row, behind its
    kronecker_affine transform and its learned activation clip; the output is finite and not RTN's."""
    from harness import QuantLinear

    gptq = quantize(outlier_model(), "W4A4", epochs=1, weight_solver="gptq")
    rtn = quantize(outlier_model(), "W4A4", epochs=1)
    linears = [m for m in gptq.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 7 and all(m.frozen for m in linears)
    assert all(isinstance(m.input_transform, KroneckerAffine) and m.act_clip is not None for m in linears)
    assert all(torch.unique(row).numel() <= 16 for m in linears for row in m.weight.detach())
    ids = tokens(2, seed=7)
    with torch.no_grad():
        out, ref = gptq.model(ids).logits, rtn.model(ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
