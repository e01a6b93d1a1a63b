from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from harness.bits import BitSpec
from harness.adapter import get_adapter
from harness.quant.qlinear import (
    QuantLinear,
    freeze,
    quant_linears,
    quantize_block,
    quantize_linears,
    quantizers_disabled,
    set_act_clip,
    with_input_transform,
)
from harness.quant.quantizer import quantize_activation, quantize_weight


def test_quant_linear_computes_on_quantized_input_and_weight():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    x = torch.randn(3, 7, 32)
    spec = BitSpec.parse("W4A8")
    ref = torch.nn.functional.linear(quantize_activation(x, 8), quantize_weight(linear.weight, spec), linear.bias)
    q = QuantLinear(linear, spec)
    torch.testing.assert_close(q(x), ref)
    freeze_ref = q(x)
    q.freeze()
    torch.testing.assert_close(q(x), freeze_ref)  # freezing stores the same quantized weight
    assert q.frozen and isinstance(q.weight_quant, nn.Identity)


def test_quantize_linears_swaps_every_decoder_linear_only(tiny_model):
    swapped = quantize_linears(tiny_model, BitSpec.parse("W4A4"))
    n_layers = tiny_model.config.num_hidden_layers
    assert len(swapped) == 7 * n_layers
    assert not isinstance(tiny_model.lm_head, QuantLinear)
    assert sum(1 for _ in quant_linears(tiny_model)) == 7 * n_layers
    assert quantize_linears(tiny_model, BitSpec.parse("W4A4")) == {}  # idempotent


def test_quantizers_disabled_gives_fp_output(tiny_model, tiny_tokens):
    with torch.no_grad():
        fp = tiny_model(tiny_tokens).logits
        quantize_linears(tiny_model, BitSpec.parse("W3A3"))
        with quantizers_disabled(tiny_model):
            torch.testing.assert_close(tiny_model(tiny_tokens).logits, fp)
        quantized = tiny_model(tiny_tokens).logits
    assert (quantized - fp).abs().max() > 1e-3


def test_freeze_whole_model(tiny_model, tiny_tokens):
    quantize_linears(tiny_model, BitSpec.parse("W4A16"))
    with torch.no_grad():
        before = tiny_model(tiny_tokens).logits
        freeze(tiny_model)
        torch.testing.assert_close(tiny_model(tiny_tokens).logits, before)
    assert all(m.frozen for _, m in quant_linears(tiny_model))


class _LearnedClip(nn.Module):
    """A weight quantizer with trainable clipping factors (as OmniQuant's LWC)."""

    def __init__(self, spec: BitSpec, rows: int) -> None:
        super().__init__()
        self.spec = spec
        self.gamma = nn.Parameter(torch.linspace(1.0, 4.0, rows)[:, None])
        self.beta = nn.Parameter(torch.linspace(3.0, 0.5, rows)[:, None])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return quantize_weight(w, self.spec, clip_min=torch.sigmoid(self.beta), clip_max=torch.sigmoid(self.gamma))


def _trainable_pair(spec: BitSpec) -> tuple[nn.Module, nn.Parameter, list[QuantLinear]]:
    """Two QuantLinears reading one input, their weights scaled by one shared trainable column scale
    (as LET's input_layernorm -> q/k/v) and clipped by trainable factors."""
    torch.manual_seed(0)
    scale = nn.Parameter(torch.rand(32) + 0.5)
    layers = []
    for out in (16, 24):
        q = QuantLinear(nn.Linear(32, out, bias=False), spec)
        q.weight.requires_grad_(False)
        q.weight_quant = _LearnedClip(spec, out)
        q.recompute_weight = True
        torch.nn.utils.parametrize.register_parametrization(q, "weight", _ColumnScale(scale), unsafe=True)
        layers.append(q)
    return nn.ModuleList(layers), scale, layers


class _ColumnScale(nn.Module):
    def __init__(self, scale: nn.Parameter) -> None:
        super().__init__()
        self._scale = [scale]  # not registered: shared by both layers

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self._scale[0][None, :]


def _loss_and_grads(layers, scale, x, forward, input_grad=True):
    x = x.clone().requires_grad_(input_grad)
    loss = sum((forward(q, x) ** 2).mean() for q in layers)
    loss.backward()
    params = [scale] + [p for q in layers for p in q.weight_quant.parameters()]
    grads = [p.grad.clone() for p in params] + ([x.grad.clone()] if input_grad else [])
    for p in params:
        p.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("input_grad", [True, False])
def test_recomputed_weight_gives_autograd_gradients(input_grad):
    """The layer's own path (weight recomputed in the backward) against plain autograd through the
    quantized weight: the same loss and the same gradients for the clip factors, the shared scale
    and the input, also when the input has no gradient (a block's first linears)."""
    spec = BitSpec.parse("W4A4")
    module, scale, layers = _trainable_pair(spec)
    x = torch.randn(3, 5, 32)

    def plain(q: QuantLinear, inp: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(q.act_quant(inp), q.quantized_weight(), q.bias)

    loss, grads = _loss_and_grads(layers, scale, x, lambda q, inp: q(inp), input_grad)
    ref_loss, ref_grads = _loss_and_grads(layers, scale, x, plain, input_grad)
    assert torch.equal(loss, ref_loss)
    assert all(g.abs().sum() > 0 for g in ref_grads)
    for g, ref in zip(grads, ref_grads):
        assert torch.equal(g, ref)


def test_recomputed_weight_keeps_no_weight_sized_tensor():
    """What autograd keeps between forward and backward: with a trainable weight, the plain graph keeps
    weight-sized tensors (scaled weight, fake-quantized weight); the layer keeps none."""
    spec = BitSpec.parse("W4A16")
    module, scale, layers = _trainable_pair(spec)
    q = layers[0]
    x = torch.randn(2, 3, 32, requires_grad=True)

    def kept_weight_sized(forward) -> int:
        """Weight-sized tensors the graph of ``forward()``'s output still holds (not the raw weight)."""
        packed = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.numel() == q.weight.numel() and t.data_ptr() != q.parametrizations.weight.original.data_ptr():
                packed.append(weakref.ref(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = forward()
        gc.collect()
        alive = sum(ref() is not None for ref in packed)
        y.sum().backward()  # the graph works
        return alive

    assert kept_weight_sized(lambda: q(x)) == 0
    q.recompute_weight = False  # the default: plain autograd through the weight
    assert kept_weight_sized(lambda: q(x)) >= 2


def test_a_learned_activation_clip_is_carried_into_the_quantized_layer(tiny_model):
    """set_act_clip on a carrier (with_input_transform): quantize_block's layer clips its input range as the carrier said."""
    layer = tiny_model.model.layers[0]
    carrier = with_input_transform(layer, "mlp.down_proj", nn.Identity())
    set_act_clip(carrier, 0.7, 0.5)
    spec = BitSpec.parse("W4A4")
    swapped = quantize_block(layer, spec, get_adapter(tiny_model))
    down = swapped["mlp.down_proj"]
    assert down.act_clip == (0.7, 0.5) and isinstance(down.input_transform, nn.Identity)
    x = torch.randn(2, 5, down.in_features)
    torch.testing.assert_close(down.act_quant(x), quantize_activation(x, 4, clip_ratio=0.7, clip_ratio_min=0.5))
    assert swapped["mlp.up_proj"].act_clip is None and swapped["mlp.up_proj"].act_quant.clip_ratio_min is None



def _count_quantizations(monkeypatch) -> list:
    """Record the width of every input an enabled activation quantizer computes (from now on, in this test)."""
    from harness.quant.quantizer import ActQuantizer

    calls = []
    original = ActQuantizer.forward

    def counting(self, x):
        if self.enabled:
            calls.append(x.shape[-1])
        return original(self, x)

    monkeypatch.setattr(ActQuantizer, "forward", counting)
    return calls


def test_linears_reading_one_tensor_quantize_it_once(monkeypatch):
    """q/k/v (and gate/up) read one tensor: with the same settings it is quantized once, and the layers compute what
    they compute alone; a write to the tensor, other settings or autograd quantize it again."""
    torch.manual_seed(0)
    spec = BitSpec.parse("W4A4")
    a, b, c = (QuantLinear(nn.Linear(32, 8), spec) for _ in range(3))
    x = torch.randn(5, 32)
    alone = [layer(x.clone()) for layer in (a, b, c)]
    calls = _count_quantizations(monkeypatch)
    with torch.no_grad():
        assert all(torch.equal(layer(x), ref) for layer, ref in zip((a, b, c), alone)) and len(calls) == 1
        x.mul_(2.0)  # written in place: its version moves
        assert torch.equal(a(x), a(x.clone())) and len(calls) == 3
        b.act_quant.clip_ratio = 0.9  # other settings
        assert torch.equal(b(x), b(x.clone())) and len(calls) == 5
        y = x.clone()
        a(y), c(y)
        assert len(calls) == 6
    with torch.enable_grad():
        z = x.clone().requires_grad_()
        a(z), c(z)
    assert len(calls) == 8  # the training path, every time
    with torch.inference_mode():
        w = torch.randn(5, 32)
        a(w), c(w)
    assert len(calls) == 10  # inference tensors keep no version counter: never reused


def test_the_kept_value_goes_with_its_input():
    from harness.quant.qlinear import _shared_input

    layer = QuantLinear(nn.Linear(16, 4), BitSpec.parse("W4A4"))
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
    value = weakref.ref(_shared_input.value)
    del x
    gc.collect()
    assert value() is None and _shared_input.value is None


@pytest.mark.parametrize("method, bits, quant", [
    ("rtn", "W4A4", {}),
    ("rtn", "W4A4KV4", {"act_symmetric": True, "act_clip_ratio": 0.9, "symmetric_grid": "full", "kv_clip_ratio": 0.95}),
    ("rtn", "W4A8g16", {"attention_scope": "projection"}),
    ("smoothquant", "W6A6", {}),
    ("quarot", "W4A4", {}),
    ("quarot", "W4A4KV4", {}),
])
def test_a_quantized_model_evaluates_as_it_trains_bit_for_bit(method, bits, quant, tiny_model, tiny_tokens, monkeypatch):
    """The logits of a quantized model without autograd (evaluation: quantize_rows, shared inputs quantized once,
    the attention and online transforms' evaluation paths) equal those with autograd on (every quantizer through
    its STE node) bit for bit; q/k/v and gate/up quantize their input once."""
    from harness.method import QuantContext
    from harness.registry import get_method
    from harness.scheme import effective_spec

    cls = get_method(method)
    options = {"weight_solver": "rtn"} if method == "quarot" else {}
    spec = effective_spec(cls, bits, quant)
    calibration = tiny_tokens if cls.needs_calibration else None
    model = cls.from_options(options).apply(tiny_model, spec, calibration, QuantContext(device=torch.device("cpu"), progress=False)).model
    with torch.enable_grad():
        reference = model(tiny_tokens).logits
    assert reference.requires_grad
    calls = _count_quantizations(monkeypatch)
    with torch.no_grad():
        fast = model(tiny_tokens).logits
    assert torch.equal(fast, reference.detach())
    from harness.quant.attention import attention_quantizers

    others = sum(q.enabled for q in attention_quantizers(model)) + sum(
        m.out_quant is not None for _, m in quant_linears(model))  # Q/K/V per head, or q/k/v outputs
    assert len(calls) == 4 * len(get_adapter(model).layers(model)) + others  # inputs of q/k/v, o, gate/up, down
