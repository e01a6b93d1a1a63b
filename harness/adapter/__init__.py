"""Model adapters: one per family, answering where a block keeps its norms and linears and performing the
equivalent transforms the methods share (``base.py``: the LLaMA layout, running a block or its attention alone,
what a family cannot do exactly; ``transforms.py``: the transforms; ``families.py``: Mistral, Qwen2, Qwen3,
Gemma3, Phi-3, Qwen3-MoE; ``fused.py``: the separate linears a family's fused or stacked projections are
prepared into). A family is chosen by its config's ``model_type``; a new family is one adapter class added to
``FAMILIES``, not a change in any method (docs/models.md).
"""
from __future__ import annotations

from typing import Any

from harness.adapter.base import LlamaAdapter, ScalePair, causal_mask
from harness.adapter.families import (
    FAMILIES, Gemma3Adapter, MistralAdapter, Phi3Adapter, Qwen2Adapter, Qwen3Adapter, Qwen3MoeAdapter,
)
from harness.adapter.fused import PREPARED_MODULES, checkpoint_state, prepared_state
from harness.errors import ConfigError

ADAPTERS: dict[str, type[LlamaAdapter]] = {t: cls for cls in FAMILIES for t in cls.model_types}
# checked against a model's config.json before any work (harness.run.preflight)
SUPPORTED_MODEL_TYPES = tuple(ADAPTERS)


def adapter_for(model_type: str | None, config: Any = None) -> LlamaAdapter:
    """The adapter of a ``model_type`` (of a model with ``config`` when given); one line naming the supported
    families otherwise."""
    if model_type not in ADAPTERS:
        raise ConfigError(f"model: model_type {model_type!r} is not supported; supported families: {', '.join(ADAPTERS)}")
    cls = ADAPTERS[model_type]
    return cls() if config is None else cls.from_config(config)


def get_adapter(model: Any) -> LlamaAdapter:
    """The adapter for ``model`` (or a config, or a config.json dict)."""
    config = getattr(model, "config", model)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return adapter_for(model_type, config)


__all__ = ["ADAPTERS", "PREPARED_MODULES", "SUPPORTED_MODEL_TYPES", "Gemma3Adapter", "LlamaAdapter", "MistralAdapter",
           "Phi3Adapter", "Qwen2Adapter", "Qwen3Adapter", "Qwen3MoeAdapter", "ScalePair", "adapter_for", "causal_mask",
           "checkpoint_state", "get_adapter", "prepared_state"]
