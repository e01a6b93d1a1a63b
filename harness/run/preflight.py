"""Checks of a sweep against the models and machine it will run on, before any work.

``harness.run.config.parse_config`` calls ``check_model`` for every model (its ``config.json`` read
without weights): the family must be one ptqbench describes, every weight group size must divide
the widths a group runs along (hidden, intermediate, attention output), and no window may be
longer than the model's positions. The run command and the sweep driver call ``check_device``
(a ``cuda`` sweep on a machine without CUDA). A model whose config is not on this machine yet
(a hub id not cached) is checked when it loads instead.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from types import SimpleNamespace

from harness.adapter import SUPPORTED_MODEL_TYPES, adapter_for
from harness.bits import BitSpec
from harness.errors import ConfigError
from harness.models import model_config


def model_widths(cfg: dict) -> dict[str, int]:
    """The input widths of the linears a weight group runs along: q/k/v/gate/up, down (an expert's in a MoE), o."""
    adapter = adapter_for(cfg.get("model_type") or "llama", cfg)  # (the LLaMA layout for a config without one)
    heads, _, head_dim = adapter.attention_geometry(SimpleNamespace(**{"head_dim": None, "num_key_value_heads": None, **cfg}))
    inter = adapter.intermediate_size(cfg)
    if inter is None:
        raise KeyError("intermediate_size")
    return {"hidden_size": cfg["hidden_size"], "intermediate_size": inter, "attention output": heads * head_dim}


def check_model(name: str, where: str, specs: Iterable[tuple[str, BitSpec]], seqlens: Iterable[tuple[str, int]]) -> None:
    """Refuse what model ``name`` cannot run: ``specs`` and ``seqlens`` are (field, value) pairs to name in errors."""
    cfg = model_config(name)
    if cfg is None:
        return
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{where}: model {name!r} is a {model_type!r} model (config.json model_type); "
                          f"ptqbench supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        widths = model_widths(cfg)
    except (KeyError, TypeError, ZeroDivisionError):
        raise ConfigError(f"{where}: model {name!r}: config.json lacks hidden_size, intermediate_size or num_attention_heads") from None
    for field, spec in specs:
        if spec.quantizes_weights and spec.w_group and any(w % spec.w_group for w in widths.values()):
            shown = ", ".join(f"{k} {v}" for k, v in widths.items())
            raise ConfigError(f"{field}: group size {spec.w_group} ({spec.name}) does not divide the widths of model "
                              f"{name!r} ({shown}); use a group size that divides {math.gcd(*widths.values())}")
    limit = cfg.get("max_position_embeddings")
    for field, seqlen in seqlens:
        if isinstance(limit, int) and seqlen > limit:
            raise ConfigError(f"{field}: {seqlen} is longer than model {name!r} allows "
                              f"(max_position_embeddings {limit}); use a seqlen <= {limit}")


def check_device(device: str, executor_kind: str) -> None:
    """``device: cuda`` needs CUDA where the runs execute: here, for the local executor."""
    import torch

    if device == "cuda" and executor_kind == "local" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' is not available on this machine (torch.cuda.is_available() is False); "
                          "use cpu or auto, or a ray/slurm executor with GPU workers")
