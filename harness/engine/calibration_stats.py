"""Per-channel statistics of module inputs over a calibration set, and the smoothing scale built on them.

SmoothQuant's activation scales, OmniQuant's smoothing initialisation and QLLM's outlier-channel
detection all start from the same number: for each input channel j of a linear, max |X_j| over
every token of the calibration set. This module is its one home:

- :func:`channel_abs_max` computes it for one tensor;
- :func:`recording_inputs` keeps a running maximum (and optionally the first samples) of the
  inputs of named submodules while the caller runs forward passes: the block-wise engine uses it
  during its teacher pass, so block-wise methods need no FP pass of their own;
- :func:`input_abs_max` runs a whole model over the calibration tokens with it (SmoothQuant);
- :func:`smoothing_scales` is SmoothQuant's s = max|X|^alpha / max|W|^(1-alpha).

Modules that share an input (q/k/v, gate/up) see the same tensor, so recording one of them is enough::

    act_max = input_abs_max(model, calibration, ["model.layers.0.self_attn.q_proj"], device=device)
    act_max["model.layers.0.self_attn.q_proj"]   # (in_features,) float32 on CPU
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

# The official SmoothQuant and OmniQuant code clamp the weight maxima and the final scales to this floor
# (mit-han-lab/smoothquant smoothquant/smooth.py, smooth_ln_fcs_llama_like; OpenGVLab/OmniQuant
# quantize/omniquant.py, the act-scale initialisation of LET).
SCALE_CLAMP_MIN = 1e-5


def channel_abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| per channel (the last dimension) over every other dimension, float32."""
    return x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()


@dataclass
class InputRecord:
    """What :func:`recording_inputs` saw: running per-channel max |input| and the first samples."""

    abs_max: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def first_samples(self, name: str) -> torch.Tensor:
        """The kept inputs of ``name`` stacked along dim 0; inputs of different lengths (a routed expert's tokens of
        each sequence) joined along the tokens as one sample, (1, tokens, width)."""
        kept = self.samples[name]
        if len({t.shape[1:] for t in kept}) > 1:
            return torch.cat([t.reshape(-1, t.shape[-1]) for t in kept]).unsqueeze(0)
        return torch.cat(kept)


@contextlib.contextmanager
def recording_inputs(root: nn.Module, names: Iterable[str], keep_samples: int = 0) -> Iterator[InputRecord]:
    """Within the block, every forward of a named submodule of ``root`` updates the record.

    ``abs_max[name]`` is the running per-channel max |input| (float32, on the input's device);
    ``samples[name]`` keeps the inputs of the first ``keep_samples`` samples (dim 0) as float32.
    Hooks are removed on exit.
    """
    record = InputRecord()

    def hook(name: str):
        def seen(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            current = channel_abs_max(x)
            record.abs_max[name] = current if name not in record.abs_max else torch.maximum(record.abs_max[name], current)
            kept = record.samples.setdefault(name, [])
            have = sum(len(s) for s in kept)
            if have < keep_samples:
                kept.append(x.float()[: keep_samples - have].clone())

        return seen

    handles = [root.get_submodule(name).register_forward_pre_hook(hook(name)) for name in dict.fromkeys(names)]
    try:
        yield record
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
    with recording_inputs(model, names) as record:
        for start in tqdm(range(0, len(calibration), batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
            model(calibration[start : start + batch_size].to(device), use_cache=False)
    missing = [n for n in names if n not in record.abs_max]
    if missing:
        raise ValueError(f"modules never ran during calibration: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return {name: record.abs_max[name].cpu() for name in names}


def smoothing_scales(act_max: torch.Tensor, weights: Iterable[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s_j = max|X_j|^alpha / max|W_j|^(1-alpha), float32.

    ``max|W_j|`` is taken over every weight in ``weights`` (the consumers of one input, e.g. q/k/v),
    clamped to >= 1e-5, and s to >= 1e-5, exactly as the official code does.
    """
    w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0).clamp(min=SCALE_CLAMP_MIN)
    act_max = act_max.to(w_max.device, torch.float32)
    return (act_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=SCALE_CLAMP_MIN)


def max_over_median(channel_max: torch.Tensor) -> float:
    """Outlier severity of a per-channel statistic: its largest value over its median.

    1 means flat channels; LLM activations typically show 10-1000 at the norm outputs.
    """
    channel_max = channel_max.float()
    return (channel_max.max() / channel_max.median().clamp_min(torch.finfo(torch.float32).tiny)).item()
