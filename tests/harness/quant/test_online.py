"""The online-transform registry: the built-in kinds rebuild from their recipes, a kind defined outside ``harness``
(here, as a plugin's stand-in, in this file) exports with ptqbench's format and reloads to the same model, and an
unknown kind, a second class for a kind or a transform holding tensors is refused in one line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from harness import BitSpec, UnknownNameError
from harness.adapter import get_adapter
from harness.export.formats import MANIFEST, PTQBENCH, ExportError
from harness.export.loader import load_quantized
from harness.export.writer import export_model
from harness.models import tiny_llama
from harness.quant.online import OnlineTransform, online_kinds, online_transform, register_online_transform
from harness.quant.qlinear import freeze, quantize_block, with_input_transform
from harness.quant.rotation import FullHadamard, HeadsThenFull, KroneckerRotation, ResidualRotation


@register_online_transform
class SignedPermutation(OnlineTransform):
    """A plugin's transform: x -> (x P) * s, a seeded permutation P and signs s; its pair W <- (W P) * s."""

    kind = "test_plugin.signed_permutation"

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        self.size, self.seed = size, seed
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("perm", torch.randperm(size, generator=g), persistent=False)
        self.register_buffer("signs", torch.randint(0, 2, (size,), generator=g) * 2.0 - 1, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.perm] * self.signs.to(x.dtype)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "size": self.size, "seed": self.seed}


class Learned(OnlineTransform):
    kind = "test_plugin.learned"

    def __init__(self, size: int) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.eye(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.to(x.dtype)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "size": self.matrix.shape[0]}


@pytest.mark.parametrize("transform, width", [(FullHadamard(), 64), (HeadsThenFull(16), 64), (HeadsThenFull(22, seed=4), 88),
                                              (KroneckerRotation(152, 3), 152), (ResidualRotation("hadamard", 88, 2), 88)])
def test_every_built_in_kind_rebuilds_from_its_recipe(transform, width):
    rebuilt = online_transform(json.loads(json.dumps(transform.to_dict())))
    assert type(rebuilt) is type(transform) and rebuilt.to_dict() == transform.to_dict()
    x = torch.randn(3, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rebuilt(x), transform(x))


def test_an_unknown_kind_is_one_line_naming_the_known_ones():
    with pytest.raises(UnknownNameError) as err:
        online_transform({"kind": "hadamrd"})
    message = str(err.value)
    assert "\n" not in message and "did you mean 'hadamard'?" in message
    assert all(kind in message for kind in ("hadamard", "heads_then_hadamard", "kronecker", "residual_rotation",
                                            SignedPermutation.kind))
    assert set(online_kinds()) >= {"hadamard", "kronecker", SignedPermutation.kind}


def test_the_registry_checks_the_class_and_refuses_a_second_class_for_a_kind():
    with pytest.raises(TypeError, match="not a subclass"):
        register_online_transform(nn.Identity)

    class Other(OnlineTransform):
        kind = "kronecker"

    with pytest.raises(ValueError, match=r"^online transform kind 'kronecker' is already registered by harness\.quant\.rotation"):
        register_online_transform(Other)
    assert online_transform({"kind": "kronecker", "size": 88, "seed": 0}).__class__ is KroneckerRotation


def with_transform(transform_of, spec: str = "W4A4"):
    """A tiny LLaMA whose down_proj of every block reads through ``transform_of(width)``, its weight folded so the FP
    function is unchanged, then every linear quantized at ``spec`` and frozen."""
    model = tiny_llama(seed=0, vocab_size=256).double()
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        down = layer.mlp.down_proj
        transform = transform_of(down.in_features)
        with torch.no_grad():  # W <- W P diag(s): (x P s)(W P s)^T = x W^T
            down.weight.copy_(transform(down.weight))
        with_input_transform(layer, "mlp.down_proj", transform)
        quantize_block(layer, BitSpec.parse(spec), adapter)
    freeze(model)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_a_plugins_transform_exports_and_reloads_to_the_same_model(tmp_path):
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = logits(tiny_llama(seed=0, vocab_size=256).double(), tokens)
    fp = with_transform(lambda n: SignedPermutation(n, seed=7), "W16A16")
    torch.testing.assert_close(logits(fp, tokens), reference, rtol=1e-12, atol=1e-12)  # the pair is exact

    model = with_transform(lambda n: SignedPermutation(n, seed=7))
    result = export_model(model, None, tmp_path / "plugin")
    assert result.format == PTQBENCH
    manifest = json.loads((tmp_path / "plugin" / MANIFEST).read_text())
    assert manifest["linears"]["model.layers.1.mlp.down_proj"]["input_transform"] == {
        "kind": SignedPermutation.kind, "size": 128, "seed": 7}
    reloaded = load_quantized(tmp_path / "plugin")
    transform = reloaded.model.layers[0].mlp.down_proj.input_transform
    assert isinstance(transform, SignedPermutation) and transform.seed == 7
    assert torch.equal(logits(reloaded, tokens), logits(model, tokens))


def test_a_transform_holding_tensors_its_recipe_does_not_rebuild_is_refused(tmp_path):
    model = with_transform(Learned)
    with pytest.raises(ExportError, match=r"^cannot export model\.layers\.0\.mlp\.down_proj: its online transform holds "):
        export_model(model, None, tmp_path / "learned")
    assert not (tmp_path / "learned").exists()


def test_the_documented_plugin_transform_registers_and_rebuilds_from_its_recipe():
    """docs/methods/quarot.md's example, exactly as printed."""
    page = (Path(__file__).resolve().parents[3] / "docs" / "methods" / "quarot.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", page, re.DOTALL) if "class SignFlip" in block]
    namespace: dict = {"__name__": "docs_quarot_example"}
    exec(code, namespace)  # noqa: S102
    flip = namespace["SignFlip"](12, seed=1)
    rebuilt = online_transform(json.loads(json.dumps(flip.to_dict())))
    assert type(rebuilt) is namespace["SignFlip"] and "my_plugin.sign_flip" in online_kinds()
    x = torch.randn(2, 12)
    assert torch.equal(rebuilt(x), flip(x)) and torch.equal(flip(flip(x)), x)
