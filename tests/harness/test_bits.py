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
