"""Per-channel statistics of module inputs over a calibration set, collected with forward hooks.

SmoothQuant's activation scales, OmniQuant's smoothing initialisation and QLLM's outlier-channel
detection all start from the same number: for each input channel j of a linear, max |X_j| over
every token of the calibration set. :func:`input_abs_max` gathers it for any set of named modules
in one pass of the whole model, keeping a running maximum, so memory does not grow with the
number of samples::

    act_max = input_abs_max(model, calibration, ["model.layers.0.self_attn.q_proj"], device=device)
    act_max["model.layers.0.self_attn.q_proj"]   # (in_features,) float32 on CPU

Modules that share an input (q/k/v, gate/up) see the same tensor, so hooking one of them is enough.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


@contextlib.contextmanager
def recording_input_abs_max(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward updates ``stats[name]``, the running per-channel max |input|.

    The statistic is float32 on the device the input lives on; hooks are removed on exit.
    """
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            # Flatten batch and sequence: the statistic is per channel over all tokens.
            current = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            stats[name] = current if name not in stats else torch.maximum(stats[name], current)

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def input_abs_max(
    model: nn.Module,
    calibration: torch.Tensor,
    names: Iterable[str],
    *,
    device: torch.device,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "input abs-max",
) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of each module in ``names`` over ``calibration`` (samples, seqlen) token ids.

    The model is moved to ``device`` (and left there) and run in eval mode without a KV cache.
    Returns float32 CPU tensors of shape (in_features,) keyed by module name.
    """
    names = list(dict.fromkeys(names))
    model.to(device).eval()
    with recording_input_abs_max(model, names) as stats:
        for start in tqdm(range(0, len(calibration), batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
            model(calibration[start : start + batch_size].to(device), use_cache=False)
    missing = [n for n in names if n not in stats]
    if missing:
        raise ValueError(f"modules never ran during calibration: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return {name: stats[name].cpu() for name in names}


def max_over_median(channel_max: torch.Tensor) -> float:
    """Outlier severity of a per-channel statistic: its largest value over its median.

    1 means flat channels; LLM activations typically show 10-1000 at the norm outputs.
    """
    channel_max = channel_max.float()
    return (channel_max.max() / channel_max.median().clamp_min(torch.finfo(torch.float32).tiny)).item()
