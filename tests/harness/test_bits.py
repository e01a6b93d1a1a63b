from __future__ import annotations

import pytest

from harness.bits import FP, BitSpec
from harness.errors import ConfigError


@pytest.mark.parametrize("text, w, a, g", [("W4A4", 4, 4, 0), ("w4a16", 4, 16, 0), ("W6A6", 6, 6, 0),
                                           ("W4A4g128", 4, 4, 128), ("W3A16", 3, 16, 0), (" W8A8 ", 8, 8, 0)])
def test_parse(text, w, a, g):
    spec = BitSpec.parse(text)
    assert (spec.w_bits, spec.a_bits, spec.w_group) == (w, a, g)
    assert BitSpec.parse(spec.name) == spec  # the short name round-trips


@pytest.mark.parametrize("text", ["W4", "A4W4", "W4A4x", "W1A4", "W4A17", "W4A4g", "4/4", ""])
def test_bad_specs_give_one_line_naming_the_syntax(text):
    with pytest.raises(ConfigError) as err:
        BitSpec.parse(text)
    message = str(err.value)
    assert "\n" not in message and "bits" in message


def test_scheme_fields_are_validated():
    with pytest.raises(ConfigError, match="weight_granularity"):
        BitSpec.parse("W4A4", w_granularity="row")
    with pytest.raises(ConfigError, match="tensor"):
        BitSpec.parse("W4A4g128", w_granularity="tensor")


def test_fp_quantizes_nothing():
    assert FP.name == "W16A16" and not FP.quantizes_weights and not FP.quantizes_activations
    assert BitSpec.parse("W4A16").quantizes_weights and not BitSpec.parse("W4A16").quantizes_activations


@pytest.mark.parametrize("text, kv, name", [("W4A4KV4", 4, "W4A4KV4"), ("w4a16kv4g64", 4, "W4A16KV4g64"), ("W4A4KV16", 16, "W4A4KV16"),
                                            ("W4A8KV8", 8, "W4A8KV8"), ("W4A4", None, "W4A4")])
def test_kv_part_parses_and_round_trips(text, kv, name):
    spec = BitSpec.parse(text)
    assert spec.kv_bits == kv and spec.name == name and BitSpec.parse(spec.name) == spec
    assert spec.quantizes_kv == (kv is not None and kv < 16)


@pytest.mark.parametrize("text", ["W4A4KV", "W4A4KV1", "W4A4KV17", "W4A4g64KV4", "W4A4K4"])
def test_a_malformed_kv_part_is_one_line(text):
    with pytest.raises(ConfigError) as err:
        BitSpec.parse(text)
    assert "\n" not in str(err.value) and "bits" in str(err.value)


def test_specs_without_kv_or_clipping_keep_their_keys():
    assert BitSpec.parse("W4A4").to_dict() == {"w_bits": 4, "a_bits": 4, "w_group": 0, "w_granularity": "channel",
                                                "w_symmetric": False, "a_symmetric": False}
    clipped = BitSpec.parse("W4A4KV4", a_clip=0.9, kv_clip=0.95)
    assert {"kv_bits": 4, "a_clip": 0.9, "kv_clip": 0.95}.items() <= clipped.to_dict().items()
    assert BitSpec.from_dict(clipped.to_dict()) == clipped
    for field, value in (("a_clip", 0), ("kv_clip", 1.5), ("a_clip", True)):
        with pytest.raises(ConfigError, match=r"^quant\.(act|kv)_clip_ratio: .* use a number in \(0, 1\]$"):
            BitSpec.parse("W4A4KV4", **{field: value})
    with pytest.raises(ConfigError, match="attention_scope"):
        BitSpec.parse("W4A4KV4", attention_scope="projection")


def test_kv_symmetry_and_the_symmetric_grid():
    spec = BitSpec.parse("W4A4KV4", a_symmetric=True, kv_symmetric=False, symmetric_grid="full")
    assert not spec.kv_sym and spec.full_grid and BitSpec.from_dict(spec.to_dict()) == spec
    assert {"kv_symmetric": False, "symmetric_grid": "full"}.items() <= spec.to_dict().items()
    assert BitSpec.parse("W4A4KV4", a_symmetric=True).kv_sym  # unset: as the activations
    assert BitSpec.parse("W4A4", a_symmetric=True, kv_symmetric=False).kv_sym  # no KV part: K/V follow the activations
    assert "kv_symmetric" not in BitSpec.parse("W4A4").to_dict() and "symmetric_grid" not in BitSpec.parse("W4A4").to_dict()
    with pytest.raises(ConfigError, match=r"^quant\.symmetric_grid: 'wide' is not allowed; use one of"):
        BitSpec.parse("W4A4", symmetric_grid="wide")
    with pytest.raises(ConfigError, match=r"^quant\.kv_symmetric: 'yes' is not allowed"):
        BitSpec.parse("W4A4KV4", kv_symmetric="yes")
