"""The quantized linear layer and the swap that puts it into a model.

``QuantLinear`` = input-activation quantizer + weight quantizer + the original weight and bias.
While a method calibrates, the weight is quantized on every forward (so gradients reach learnable
quantizer parameters). ``freeze()`` then stores the fake-quantized weight once, so evaluation pays
only for the activation quantizer, and layers that read one tensor with the same quantizer settings
(q/k/v, gate/up) quantize it once (``_SharedInput``).

``recompute_weight`` (off by default; methods turn it on for a ``low_memory`` option) trades time
for memory while a method trains: the layer keeps only its input for the backward pass and computes
the quantized weight again there (:class:`_RecomputedWeightLinear`), with the same gradients bit for
bit. Otherwise a block's worth of fake-quantized weights, LET-scaled weights and their intermediates
stays alive from the forward to the backward of every step (measured: 627 MB for a 196 MB float32
block), and a weight a quantizer rebuilds on each call from a compact form (QLLM's Q(W) as integer
codes) would be kept in full.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapter import LlamaAdapter, get_adapter
from harness.bits import FP, BitSpec
from harness.quant import attention
from harness.quant.quantizer import ActQuantizer, WeightQuantizer


class _RecomputedWeightLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` that keeps only ``x`` and recomputes the weight in the backward.

    ``weight`` is ``recompute()``'s value, passed detached; the backward calls ``recompute()`` again
    with autograd on (under the forward's autocast state: ``custom_fwd`` / ``custom_bwd``) and sends
    the weight's gradient down that fresh graph to the leaves it depends on (clipping factors, LET
    scales), as reentrant activation checkpointing does. The products are the ones autograd takes
    for a linear of a contiguous weight, in its order (aten mm_mat2_backward of ``x @ W.t()``): grad_x =
    grad @ W, grad_W = grad^T @ x over the flattened tokens, so the gradients are autograd's bit for bit.
    Like reentrant checkpointing, it works with ``loss.backward()`` (what ``harness.engine.blockwise.train``
    calls), not with ``torch.autograd.grad``: the leaves' gradients are accumulated into ``.grad``.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                recompute: Callable[[], torch.Tensor], anchor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.recompute = recompute
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            weight = ctx.recompute()
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad.matmul(weight.detach().to(grad.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        if weight.requires_grad:
            grad_weight = flat_grad.t().matmul(x.reshape(-1, x.shape[-1]).to(grad.dtype))
            torch.autograd.backward(weight, grad_weight.to(weight.dtype))
        grad_bias = flat_grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None, None


def linear_recomputing_weight(x: torch.Tensor, weight_fn: Callable[[], torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight_fn(), bias)`` that keeps no weight for the backward pass, recomputing it there."""
    weight = weight_fn()
    if not torch.is_grad_enabled() or not (weight.requires_grad or x.requires_grad) or (bias is not None and bias.requires_grad):
        return F.linear(x, weight, bias)
    # The weight's graph (and every intermediate it saved) is freed when ``weight`` goes out of scope.
    # ``anchor`` requires grad so autograd records the node even when nothing else passed in does
    # (the first linears of a block: their input has no gradient, only their clipping factors).
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _RecomputedWeightLinear.apply(x, weight.detach(), bias, weight_fn, anchor)


class _SharedInput(threading.local):
    """The last input a ``QuantLinear`` quantized without autograd, and its quantized value.

    q/k/v (and gate/up) read the same tensor through quantizers with the same settings: the second and third
    compute what the first did. A layer whose quantizer is a plain ``ActQuantizer`` with the same settings, given
    the same tensor object at the same version (nothing wrote to it, nor to the quantized value), takes the kept
    value instead of computing it again. The input is held weakly: the value is dropped when the input is freed
    (at the end of the attention or MLP that read it). Inference-mode tensors keep no version counter, so they are
    never reused; nor is anything autograd has to see.
    """

    def __init__(self) -> None:
        self.source: weakref.ref | None = None
        self.state: tuple = ()
        self.value: torch.Tensor | None = None

    def _drop(self, ref: weakref.ref) -> None:
        if self.source is ref:
            self.source, self.value = None, None

    def quantize(self, quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if type(quantizer) is not ActQuantizer or not quantizer.enabled or x.is_inference() or (
                x.requires_grad and torch.is_grad_enabled()):
            return quantizer(x)
        settings = (quantizer.bits, quantizer.symmetric, quantizer.clip_ratio, quantizer.clip_ratio_min,
                    quantizer.full_grid)
        value = self.value
        if (value is not None and self.source() is x and self.state == (x._version, value._version, settings)):
            return value
        value = quantizer(x)
        self.source = weakref.ref(x, self._drop)
        self.state, self.value = (x._version, value._version, settings), value
        return value


_shared_input = _SharedInput()


class QuantLinear(nn.Module):
    """A drop-in replacement for ``nn.Linear`` that fake-quantizes its input and weight."""

    # class defaults, so a block pickled before the attributes existed (a checkpoint) still runs
    recompute_weight: bool = False
    # learned clip ratios of the input's per-token range, (of its max, of its min), set by ``set_act_clip`` (FlatQuant's
    # LAC): part of the layer's function, in place of the spec's ``a_clip``; kept by ``quantize_block`` and exports
    act_clip: tuple[float, float] | None = None

    def __init__(self, linear: nn.Linear, spec: BitSpec) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.spec = spec
        self.act_quant = ActQuantizer(spec.a_bits, spec.a_symmetric, spec.a_clip, spec.full_grid)
        self.weight_quant: nn.Module = WeightQuantizer(spec)
        self.out_quant: ActQuantizer | None = None  # set for q/k/v with attention_scope "projection"
        # An online transform of the input before it is quantized (a rotation's Hadamard: harness.quant.rotation),
        # part of the layer's function: the weight was folded against it. (Read with getattr: a block pickled
        # before the attribute existed, a checkpoint, has none.)
        self.input_transform: nn.Module | None = None
        # A trainable path on the quantized input, added to the output (QLLM's low-rank correction while it
        # trains: Q(W) x + s B (A x) without materializing a weight-sized B @ A or its gradient every step).
        self.side: nn.Module | None = None
        self.frozen = False

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.frozen else self.weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        transform = getattr(self, "input_transform", None)
        if transform is not None:
            x = transform(x)
        x = _shared_input.quantize(self.act_quant, x)
        if self.recompute_weight and not self.frozen:
            y = linear_recomputing_weight(x, self.quantized_weight, self.bias)
        else:
            y = F.linear(x, self.quantized_weight(), self.bias)
        if self.side is not None:
            y = y + self.side(x)
        return y if self.out_quant is None else self.out_quant(y)

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the weight by its fake-quantized value; the weight quantizer is not used again.

        A quantizer that can say its scale and zero point (``quant_params``) leaves them behind as
        ``weight_scale`` / ``weight_zero`` (non-persistent buffers, per row of the grouped weight) so
        ``harness.export.formats`` can write integer weights that dequantize to exactly this weight.
        """
        if not self.frozen:
            params = getattr(self.weight_quant, "quant_params", None)
            if params is not None and getattr(self.weight_quant, "enabled", False):
                scale, zero = params(self.weight)
                self.register_buffer("weight_scale", scale.detach().clone(), persistent=False)
                self.register_buffer("weight_zero", zero.detach().clone(), persistent=False)
            self.weight.data = self.weight_quant(self.weight).to(self.weight.dtype)
            self.weight_quant = nn.Identity()
            self.frozen = True

    @classmethod
    def frozen_from(cls, linear: nn.Linear, spec: BitSpec) -> QuantLinear:
        """A frozen layer around a linear whose weight is already quantized (a reloaded export)."""
        layer = cls(linear, spec)
        layer.weight_quant, layer.frozen = nn.Identity(), True
        return layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, spec={self.spec.name}, frozen={self.frozen}"


def quantize_block(
    layer: nn.Module,
    spec: BitSpec,
    adapter: LlamaAdapter,
    include: Callable[[str, nn.Linear], bool] | None = None,
    prefix: str = "",
) -> dict[str, QuantLinear]:
    """Swap one decoder block's linears for ``QuantLinear`` in place; return them by name.

    With ``spec.quantizes_attention`` the block's attention also gets its Q/K/V quantizer
    (``harness.quant.attention``), installed here so every method quantizes exactly the same tensors.
    """
    per_head = spec.attention_scope == "head" and (spec.quantizes_attention or spec.quantizes_kv)
    if per_head and not hasattr(layer.get_submodule(adapter.attention_path), attention.ATTRIBUTE):
        attention.install(layer.get_submodule(adapter.attention_path), spec)
    swapped: dict[str, QuantLinear] = {}
    for name in adapter.linear_names:
        parent_name, _, attr = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        linear = getattr(parent, attr)
        qualified = prefix + name
        carrier = isinstance(linear, QuantLinear) and linear.spec == PASS_THROUGH  # an online transform's holder
        if (isinstance(linear, QuantLinear) and not carrier) or (include is not None and not include(qualified, linear)):
            continue
        qlinear = QuantLinear(linear, spec)
        if carrier:
            qlinear.input_transform = linear.input_transform
            if linear.act_clip is not None:
                set_act_clip(qlinear, *linear.act_clip)
        if spec.quantizes_attention and spec.attention_scope == "projection" and name in adapter.attn_in.consumers:
            # SmoothQuant's official quantize_bmm_input: q/k/v outputs per token over all heads,
            # before RoPE (mit-han-lab/smoothquant c61476d7 fake_quant.py L89-108, L209-226)
            qlinear.out_quant = ActQuantizer(spec.a_bits, spec.a_symmetric, full_grid=spec.full_grid)
        setattr(parent, attr, qlinear)
        swapped[qualified] = qlinear
    return swapped


# The spec of a QuantLinear that only carries an online input transform (``with_input_transform``).
PASS_THROUGH = FP


def with_input_transform(layer: nn.Module, name: str, transform: nn.Module) -> QuantLinear:
    """Put ``transform`` in front of linear ``name`` of ``layer``, before it is quantized.

    The linear becomes a ``QuantLinear`` that quantizes nothing and carries the transform; a later
    ``quantize_block`` swaps in the method's spec and keeps the transform, so a method can change a
    block's structure (a rotation) first and quantize it with any weight solver after.
    """
    parent_name, _, attr = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    linear = getattr(parent, attr)
    if not isinstance(linear, QuantLinear):
        linear = QuantLinear(linear, PASS_THROUGH)
        setattr(parent, attr, linear)
    linear.input_transform = transform
    return linear


def set_act_clip(qlinear: QuantLinear, clip_max: float, clip_min: float) -> None:
    """Clip the layer's per-token input range: its max times ``clip_max``, its min times ``clip_min`` (learned ratios in
    (0, 1], FlatQuant's LAC), in place of the spec's ``a_clip``. Recorded on the layer (``act_clip``), so a carrier
    (``with_input_transform``) hands it to the layer ``quantize_block`` swaps in, and an export keeps it."""
    qlinear.act_clip = (float(clip_max), float(clip_min))
    qlinear.act_quant.clip_ratio, qlinear.act_quant.clip_ratio_min = qlinear.act_clip


def quantize_linears(
    model: nn.Module,
    spec: BitSpec,
    include: Callable[[str, nn.Linear], bool] | None = None,
) -> dict[str, QuantLinear]:
    """Swap the decoder blocks' linears for ``QuantLinear`` in place; return them by qualified name.

    Which linears exist comes from the model adapter (for LLaMA: q/k/v/o and gate/up/down of every
    block); the embedding and ``lm_head`` stay in full precision, as in all the papers compared here.
    ``include(name, linear)`` narrows the selection further.
    """
    adapter = get_adapter(model)
    swapped: dict[str, QuantLinear] = {}
    for i, layer in enumerate(adapter.layers(model)):
        swapped.update(quantize_block(layer, spec, adapter, include, prefix=f"{adapter.layers_path}.{i}."))
    return swapped


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear))


def freeze(model: nn.Module) -> None:
    """Freeze every ``QuantLinear`` of the model (see :meth:`QuantLinear.freeze`)."""
    for _, module in quant_linears(model):
        module.freeze()


@contextlib.contextmanager
def quantizers_disabled(*models: nn.Module, weights: bool = True) -> Iterator[None]:
    """Run the models (a model, or several blocks) with every activation, attention-input and (unfrozen) weight
    quantizer turned off; ``weights=False`` leaves the weight quantizers on (weights quantized, activations FP)."""
    saved = []
    kinds = ("act_quant", "out_quant") + (("weight_quant",) if weights else ())
    quantizers = [q for model in models for q in
                  [getattr(module, kind) for _, module in quant_linears(model) for kind in kinds]
                  + attention.attention_quantizers(model)]
    for q in quantizers:
        if hasattr(q, "enabled"):
            saved.append((q, q.enabled))
            q.enabled = False
    try:
        yield
    finally:
        for q, enabled in saved:
            q.enabled = enabled
