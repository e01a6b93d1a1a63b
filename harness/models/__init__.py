"""Models: the zoo and loading (``harness.models.load``), lazy models whose blocks stay on disk until used
(``harness.models.lazy``).

    loaded = load_model("smollm2-135m")   # a zoo name, a local Hugging Face folder or a hub id
"""
from __future__ import annotations

from harness.models.load import (
    TINY_CONFIG, TINY_FAMILY_CONFIGS, ZOO, LoadedModel, ZooEntry, check_model_name, gguf_folder, has_safetensors, hub_folder, load_model,
    model_config, resolve_device, resolve_dtype, tiny_llama, tiny_model, tiny_name,
)

__all__ = ["TINY_CONFIG", "TINY_FAMILY_CONFIGS", "ZOO", "LoadedModel", "ZooEntry", "check_model_name", "gguf_folder", "has_safetensors", "hub_folder",
           "load_model", "model_config", "resolve_device", "resolve_dtype", "tiny_llama", "tiny_model", "tiny_name"]
