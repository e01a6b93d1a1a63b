"""Rotation (norm folding, residual rotation, Hadamard pairs with online transforms) leaves the FP model unchanged."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from harness import BitSpec, QuantContext
from harness.adapter import get_adapter
from harness.export.loader import load_quantized
from harness.export.writer import export_model
from harness.models import tiny_llama, tiny_model
from harness.quant import rotation
from harness.quant.hadamard import random_hadamard
from harness.quant.qlinear import quantize_block

# (heads, kv_heads, hidden, intermediate, tied): GQA with a tied head; 3 heads (no Hadamard of order 3, as
# smollm2's 9) over widths 48 = 12 x 4 and 96 = 12 x 8; multi-head attention with an untied head; no width with a
# Hadamard matrix (hidden 88 = 11 x 8, head_dim 22 = 11 x 2, MLP 152 = 19 x 8: R_K ⊗ H_m everywhere)
GEOMETRIES = [(4, 2, 64, 128, True), (3, 1, 48, 96, True), (4, 4, 64, 160, False), (4, 2, 88, 152, False)]


def model_with_norms(heads: int, kv_heads: int, hidden: int, intermediate: int, tied: bool):
    model = tiny_llama(seed=1, vocab_size=300, hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=hidden // heads, tie_word_embeddings=tied)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # norm weights that are not 1, so folding them is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.double()


def rotate(model, seed: int = 0, online: bool = True, **options) -> torch.nn.Module:
    adapter = get_adapter(model)
    _, _, head_dim = adapter.attention_geometry(model)
    q = random_hadamard(model.config.hidden_size, seed)
    rotation.rotate_ends(model, adapter, q, **options)
    for layer in adapter.layers(model):
        transforms = rotation.rotate_block(layer, adapter, q, head_dim)
        for name, qlinear in quantize_block(layer, BitSpec.parse("W16A16"), adapter).items():
            if online:
                qlinear.input_transform = transforms.get(name)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_rotated_model_equals_the_original_in_fp(geometry):
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    model = model_with_norms(*geometry)
    reference = logits(model, tokens)
    rotated = rotate(model)
    out = logits(rotated, tokens)
    assert (out - reference).abs().max() <= 1e-4 * reference.abs().max()
    adapter = get_adapter(rotated)
    assert adapter.lm_head(rotated).weight is not adapter.embed(rotated).weight and not rotated.config.tie_word_embeddings
    layer = adapter.layers(rotated)[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not torch.allclose(adapter.embed(rotated).weight, adapter.embed(model_with_norms(*geometry)).weight)


def test_without_the_online_transforms_the_model_is_another_function():
    tokens = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    reference = logits(model_with_norms(*GEOMETRIES[0]), tokens)
    out = logits(rotate(model_with_norms(*GEOMETRIES[0]), online=False), tokens)
    assert (out - reference).abs().max() > 1e-2 * reference.abs().max()


def test_official_embedding_mean_subtraction_is_a_small_fp_change():
    tokens = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    reference = logits(model_with_norms(*GEOMETRIES[0]), tokens)
    out = logits(rotate(model_with_norms(*GEOMETRIES[0]), embed_mean=True), tokens)
    assert (out - reference).abs().max() > 1e-6 * reference.abs().max()


def test_a_rotated_model_exports_and_reloads_with_its_online_transforms(tmp_path):
    tokens = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    model = rotate(model_with_norms(*GEOMETRIES[1]))
    reference = logits(model, tokens)
    result = export_model(model, None, tmp_path / "rotated")
    assert result.format == "ptqbench" and "online transform" in result.reason
    reloaded = load_quantized(tmp_path / "rotated")
    kinds = {type(q.input_transform).__name__ for q in reloaded.modules() if hasattr(q, "input_transform") and q.input_transform}
    assert kinds == {"FullHadamard", "HeadsThenFull"}
    assert torch.allclose(logits(reloaded.double(), tokens), reference, rtol=1e-6, atol=1e-8)


def test_widths_without_a_hadamard_rotate_by_kronecker_products_that_export_and_reload(tmp_path):
    """Hidden 88, head_dim 22 and MLP 152 have no Hadamard matrix: the residual rotation is diag(s) (R_11 ⊗ H_8), o_proj
    reads through the per-head R_11 ⊗ H_2 undone and R_11 ⊗ H_8, down_proj through R_19 ⊗ H_8, all of seed 5."""
    tokens = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    model = model_with_norms(*GEOMETRIES[3])
    reference = logits(model, tokens)
    adapter = get_adapter(model)
    q = random_hadamard(88, 5)
    rotation.rotate_ends(model, adapter, q)
    for layer in adapter.layers(model):
        transforms = rotation.rotate_block(layer, adapter, q, 22, seed=5)
        for name, qlinear in quantize_block(layer, BitSpec.parse("W16A16"), adapter).items():
            qlinear.input_transform = transforms.get(name)
    assert (logits(model, tokens) - reference).abs().max() <= 1e-6 * reference.abs().max()  # RMSNorm computes in float32
    layer = model.model.layers[1]
    assert layer.mlp.down_proj.input_transform.to_dict() == {"kind": "kronecker", "size": 152, "seed": 5}
    assert layer.self_attn.o_proj.input_transform.to_dict() == {"kind": "heads_then_hadamard", "head_dim": 22, "seed": 5}
    export_model(model, None, tmp_path / "kronecker")
    reloaded = load_quantized(tmp_path / "kronecker")
    assert isinstance(reloaded.model.layers[0].mlp.down_proj.input_transform, rotation.KroneckerRotation)
    assert torch.equal(logits(reloaded, tokens), logits(model, tokens))


def test_the_documented_online_transform_example_keeps_the_fp_function(tiny_model, tiny_tokens):
    """docs/methods/quarot.md's plugin example: a Hadamard before down_proj, installed with with_input_transform, at W16A16."""
    page = (Path(__file__).resolve().parents[3] / "docs" / "methods" / "quarot.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", page, re.DOTALL) if "class HadamardDown" in block]
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 (the documented example exactly as printed)
    reference = logits(tiny_model, tiny_tokens)
    method = namespace["HadamardDown"]()
    method.quantize(tiny_model, BitSpec.parse("W16A16"), tiny_tokens, QuantContext(device=torch.device("cpu"), progress=False))
    down = tiny_model.model.layers[0].mlp.down_proj
    assert type(down.input_transform).__name__ == "FullHadamard"
    assert torch.allclose(logits(tiny_model, tiny_tokens), reference, rtol=1e-4, atol=1e-5)


def gemma_with_norms():
    """A tiny Gemma3 (post-norms: its residual rotation runs online) with norm factors away from 1, float64."""
    model = tiny_model("gemma3_text", seed=1)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(2)
    for name, module in model.named_modules():
        if name.endswith("norm"):
            adapter.set_norm_scale(module, 0.5 + torch.rand(module.weight.shape, generator=g))
    return model.double()


def rotate_online(model, kind: str, seed: int = 0) -> torch.nn.Module:
    adapter = get_adapter(model)
    residual = rotation.ResidualRotation(kind, model.config.hidden_size, seed)
    q = residual.matrix()
    rotation.rotate_ends(model, adapter, q)
    for layer in adapter.layers(model):
        transforms = rotation.rotate_block(layer, adapter, q, adapter.attention_geometry(model)[2], residual)
        for name, qlinear in quantize_block(layer, BitSpec.parse("W16A16"), adapter).items():
            qlinear.input_transform = transforms.get(name)
    return model


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_an_online_residual_rotation_keeps_gemmas_fp_function_and_exports(kind, tmp_path):
    """Gemma3's post-norms do not commute with a rotation of the residual stream: the stream keeps its basis, the
    embedding and head are untouched, and each reader (q/k/v, gate/up) rotates its input online by the same Q."""
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model = gemma_with_norms()
    reference, embedding = logits(model, tokens), model.model.embed_tokens.weight.detach().clone()
    rotated = rotate_online(model, kind)
    assert rotation.residual_online(get_adapter(rotated))
    torch.testing.assert_close(logits(rotated, tokens), reference, rtol=1e-5, atol=1e-5)  # Gemma's norms compute in float32
    assert torch.equal(rotated.model.embed_tokens.weight, embedding)
    layer = rotated.model.layers[0]
    q = layer.self_attn.q_proj.input_transform
    assert isinstance(q, rotation.ResidualRotation) and layer.mlp.up_proj.input_transform is q
    # the online x Q is the matrix's
    x = torch.randn(3, rotated.config.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(q(x), x @ q.matrix())
    export_model(rotated, None, tmp_path / "gemma")
    reloaded = load_quantized(tmp_path / "gemma")
    assert reloaded.model.layers[1].self_attn.k_proj.input_transform.to_dict() == q.to_dict()
    torch.testing.assert_close(logits(reloaded.double(), tokens), logits(rotated, tokens), rtol=1e-6, atol=1e-8)
