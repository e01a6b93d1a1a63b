"""The LLaMA adapter's names and its refusal of a family it does not describe (running blocks and the
operations, for every family: test_families.py)."""
from __future__ import annotations

import pytest
import torch

from harness.adapter import get_adapter
from harness.errors import ConfigError


def test_pairs_name_real_modules(tiny_model):
    adapter = get_adapter(tiny_model)
    layer = adapter.layers(tiny_model)[0]
    for pair in (adapter.attn_in, adapter.mlp_in, adapter.attn_out, adapter.mlp_out):
        layer.get_submodule(pair.producer)
        for name in pair.consumers:
            assert isinstance(layer.get_submodule(name), torch.nn.Linear)
    assert len(adapter.linear_names) == 7
    assert adapter.attention_geometry(tiny_model) == (4, 2, 16)


def test_unsupported_family_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="not supported"):
        get_adapter(model)
