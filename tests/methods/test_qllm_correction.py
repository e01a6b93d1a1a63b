"""Low-rank error correction (methods/qllm/correction.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness import BitSpec, QuantLinear, quantizers_disabled
from methods.qllm.correction import (
    CachedWeight,
    LowRank,
    NormWithBias,
    add_lowrank,
    fold_bias_into_head,
    merge_lowrank,
    weights_offloaded,
)


def make_linear(spec: str, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear(nn.Linear(48, 24, bias=True), BitSpec.parse(spec))


def randomize(lowrank: LowRank, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lowrank.lora_B.copy_(torch.randn(lowrank.lora_B.shape, generator=g) * 0.1)


def test_initial_correction_is_zero_and_a_is_kaiming():
    linear = make_linear("W4A16")
    lowrank = add_lowrank(linear, rank=4, alpha=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(lowrank.lora_B) == 0 and torch.count_nonzero(lowrank.lora_A) == lowrank.lora_A.numel()
    assert lowrank.lora_A.abs().max() <= 1 / 48**0.5  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert lowrank.scaling == 0.25 and not linear.weight.requires_grad


@pytest.mark.parametrize("spec", ["W16A16", "W4A16"])
def test_merging_matches_the_unmerged_low_rank_path_before_quantization(spec):
    linear = make_linear(spec)
    x = torch.randn(5, 7, 48, generator=torch.Generator().manual_seed(3))
    lowrank = add_lowrank(linear, rank=4, alpha=1.0, generator=torch.Generator().manual_seed(0))
    randomize(lowrank, 1)
    expected_delta = lowrank.lora_B.detach() @ lowrank.lora_A.detach() * 0.25
    with torch.no_grad(), quantizers_disabled(linear):
        unmerged = linear(x)
    original = linear.weight.detach().clone()
    merge_lowrank(linear)
    assert linear.side is None and not isinstance(linear.weight_quant, CachedWeight)
    torch.testing.assert_close(linear.weight.detach(), original + expected_delta)
    with torch.no_grad(), quantizers_disabled(linear):
        merged = linear(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-6)


def test_training_path_equals_the_official_merged_weight_form_with_its_gradients():
    # official int_linear_lora: F.linear(Q(x), Q(W) + B @ A * s, b), computed here independently
    linear = make_linear("W4A4")
    quantized = linear.weight_quant(linear.weight).detach()
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(4))
    lowrank = add_lowrank(linear, rank=2, alpha=1.0, generator=torch.Generator().manual_seed(0))
    randomize(lowrank, 2)
    a, b = (lowrank.lora_A.detach().clone().requires_grad_(True), lowrank.lora_B.detach().clone().requires_grad_(True))
    official = torch.nn.functional.linear(linear.act_quant(x), quantized + b @ a * 0.5, linear.bias.detach())
    ours = linear(x)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)
    ours.square().sum().backward()
    official.square().sum().backward()
    torch.testing.assert_close(lowrank.lora_A.grad, a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lowrank.lora_B.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert linear.weight.grad is None  # the frozen weight gets no weight-sized gradient


class _FloatCache(nn.Module):
    """Q(W) cached as a float tensor (CachedWeight before it kept codes): the reference."""

    def __init__(self, quantized: torch.Tensor) -> None:
        super().__init__()
        self.quantized = quantized

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantized


@pytest.mark.parametrize("spec", ["W4A4", "W3A8g16"])
def test_low_memory_cache_keeps_codes_and_trains_exactly_as_a_float_cache(spec):
    """low_memory: Q(W) is kept as 1-byte codes and dequantized per call; the forward, the input's gradient and the
    low-rank gradients are the float cache's bit for bit, and the graph keeps no dequantized weight."""
    ours, ref = make_linear(spec), make_linear(spec)
    quantized = ref.weight_quant(ref.weight).detach()
    lowrank = add_lowrank(ours, rank=2, alpha=1.0, generator=torch.Generator().manual_seed(0), low_memory=True)
    ref_lowrank = add_lowrank(ref, rank=2, alpha=1.0, generator=torch.Generator().manual_seed(0))
    ref.weight_quant = _FloatCache(quantized)
    randomize(lowrank, 2)
    randomize(ref_lowrank, 2)
    cached = ours.weight_quant
    assert isinstance(cached, CachedWeight) and cached.compact and cached.codes.element_size() == 1
    assert not hasattr(cached, "base")
    assert torch.equal(cached(ours.weight), quantized)

    grads = []
    for linear in (ours, ref):
        x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        kept = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.numel() == linear.weight.numel() and t.data_ptr() != linear.weight.data_ptr():
                kept.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = linear(x * 1.0)
        y.square().sum().backward()
        grads.append((y.detach(), x.grad, linear.side.lora_A.grad, linear.side.lora_B.grad, len(kept)))
    (y, gx, ga, gb, kept), (ref_y, ref_gx, ref_ga, ref_gb, _) = grads
    assert torch.equal(y, ref_y) and torch.equal(gx, ref_gx) and torch.equal(ga, ref_ga) and torch.equal(gb, ref_gb)
    assert kept == 0  # the float cache's graph keeps its Q(W) (one reference, no copy); ours keeps nothing
    assert ours.weight.grad is None


def test_cached_weight_falls_back_to_a_float_copy_when_codes_cannot_hold_it():
    linear = make_linear("W4A16")
    with torch.no_grad():
        linear.weight[0, 0] = float("inf")
    expected = linear.weight_quant(linear.weight)
    add_lowrank(linear, rank=2, alpha=1.0, generator=torch.Generator().manual_seed(0), low_memory=True)
    assert not linear.weight_quant.compact
    torch.testing.assert_close(linear.weight_quant(linear.weight), expected, equal_nan=True)


def test_offloaded_weights_leave_memory_and_come_back_bit_for_bit(tmp_path):
    linears = [make_linear("W4A8", seed) for seed in range(3)]
    for linear in linears:
        add_lowrank(linear, rank=2, alpha=1.0, generator=torch.Generator().manual_seed(0), low_memory=True)
    before = [linear.weight.detach().clone() for linear in linears]
    x = torch.randn(5, 48)
    expected = [linear(x) for linear in linears]
    with weights_offloaded(linears, tmp_path) as restore:
        assert all(linear.weight.is_meta for linear in linears)
        assert len(list(tmp_path.rglob("*.bin"))) == 3  # in the scratch folder, not in memory
        for linear, want in zip(linears, expected):  # the forward reads only the cached Q(W)
            assert torch.equal(linear(x), want)
        restore(linears[1])  # one back early (before its merge); the others when the block ends
        assert torch.equal(linears[1].weight, before[1]) and linears[0].weight.is_meta
    assert not list(tmp_path.iterdir())  # the file is gone
    for linear, want in zip(linears, before):
        assert torch.equal(linear.weight, want) and not linear.weight.requires_grad


def test_offloaded_weights_come_back_when_the_body_fails(tmp_path):
    linear = make_linear("W4A8")
    add_lowrank(linear, rank=2, alpha=1.0, generator=torch.Generator().manual_seed(0), low_memory=True)
    before = linear.weight.detach().clone()
    with pytest.raises(RuntimeError, match="diverged"), weights_offloaded([linear], tmp_path):
        raise RuntimeError("diverged")
    assert torch.equal(linear.weight, before) and not list(tmp_path.iterdir())


def test_final_norm_bias_folds_into_the_head_exactly():
    torch.manual_seed(0)
    norm = nn.RMSNorm(16)
    student = NormWithBias(norm)
    with torch.no_grad():
        student.bias.copy_(torch.randn(16))
    head = nn.Linear(16, 40, bias=False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = head(student(x))
        fold_bias_into_head(head, student.bias)
        torch.testing.assert_close(head(norm(x)), expected, rtol=1e-5, atol=1e-5)
