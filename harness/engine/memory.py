"""Peak memory of a run, estimated from the model config before anything loads, and the up-front check.

``ptqbench run --dry-run`` prints :func:`estimate` per run, and ``execute`` refuses a run that the
machine cannot hold (:func:`check_fits`) before spending hours on it. The estimate follows what the
out-of-core engine keeps (``harness.models.lazy``, ``harness.engine.blockwise``, ``harness.evaluation.evaluate``):

- host: the Python/torch runtime (plus the tokenizer's peak on the calibration text), the eagerly loaded embedding / final norm / head, one block
  group as loaded plus its float32 working copy, and (CPU runs, or CUDA runs whose activations
  do not fit on the device) the engine's three calibration buffers and evaluation hidden states;
- device (CUDA): the block group in float32, the activation buffers when they fit, per-sample
  temporaries of a training step (attention and MLP intermediates with their gradients), what the
  method says it holds (``Method.working_memory``: its block group size, weight copies, other bytes, the
  search inputs it keeps and the activations per window token of its backward passes), and the evaluation's
  hidden states and logits of one batch.

On CPU the device is the host, so both numbers are added into the host figure. ``harness.bench.scale``
prints the estimate beside measured peaks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import ResourceUnavailableError
from harness.method import WorkingMemory

log = logging.getLogger(__name__)

GB = 2**30
# Resident size of a Python process with torch, transformers and the tokenizer imported (measured
# on CPU: ~0.55-0.7 GB); counted once in the host figure.
RUNTIME_BYTES = int(0.7 * GB)
# Tokenizing a calibration corpus's whole train split at once (Brown: 1.2M tokens) peaks at about
# this much on top of the runtime (measured: 1.40 vs 0.72 GB peak RSS for runs with and without
# calibration on a tiny model). Only a run that finds the token cache cold pays it (harness.data.token_cache;
# `ptqbench prepare` fills the cache), but the estimate cannot tell, so it stays an upper bound.
TOKENIZE_BYTES = int(0.7 * GB)
# Windows assumed when the evaluation scores a whole corpus (max_windows: null).
DEFAULT_EVAL_WINDOWS = 256
# Live per-sample tensors of a training step, in units of one (seqlen x width) float32 activation:
# inputs, outputs and saved tensors of every op of a block, with their gradients.
TRAIN_TEMPORARIES = 12


@dataclass(frozen=True)
class MemoryEstimate:
    host_bytes: int
    device_bytes: int  # 0 on CPU (counted in host_bytes)

    def describe(self) -> str:
        dev = f", device {self.device_bytes / GB:.2f} GB" if self.device_bytes else ""
        return f"host {self.host_bytes / GB:.2f} GB{dev}"


def model_config(name: str) -> Any | None:
    """The model's transformers config without loading weights (``harness.models.model_config``: zoo configs,
    converted packaged models, local folders, the local hub cache); None where this machine has none yet."""
    from harness.method import pretrained_config
    from harness.models import model_config as config_json

    try:
        data = config_json(name)
        return None if data is None else pretrained_config(data)
    except (OSError, ValueError, ResourceUnavailableError):
        return None


def dtype_bytes(dtype: str, device: torch.device) -> int:
    from harness.models import resolve_dtype

    return resolve_dtype(dtype, device).itemsize


def estimate(run: Any, config: Any | None = None) -> MemoryEstimate | None:
    """Peak host and device bytes of ``run`` (a ``RunSpec``); None when the model's config is not available."""
    from harness.models import resolve_device

    config = config or model_config(run.model)
    if config is None:
        return None
    device = resolve_device(run.device)
    b = dtype_bytes(run.dtype, device)
    from harness.adapter import get_adapter

    adapter = get_adapter(config)
    h, inter, vocab = config.hidden_size, adapter.intermediate_size(config), config.vocab_size  # inter: an expert's in a MoE
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    mlp = 3 * h * inter * max(1, adapter.experts) + h * adapter.experts  # every expert's gate/up/down and the router
    block = 2 * h * heads * head_dim + 2 * h * kv * head_dim + mlp + 2 * h
    own = working_memory(run, config)
    group = block * own.blocks_per_job
    eager = vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2) + h
    host = RUNTIME_BYTES + eager * b + group * b
    dev = group * 4 * (1 + own.weight_copies)  # the group's float32 working copy, and the method's own copies
    dev += own.extra_bytes  # the method's own working set (GPTQ's Hessians)
    calib = run.calibration
    acts = 0
    if calib is not None:
        host += TOKENIZE_BYTES
        acts = 3 * calib.samples * calib.seqlen * h * b
        width = 4 * h + 3 * inter + heads * calib.seqlen  # attention scores per row, MLP intermediates
        dev += TRAIN_TEMPORARIES * calib.seqlen * width * 4
        kept = calib.samples if own.samples is None else min(own.samples, calib.samples)
        dev += kept * calib.seqlen * (2 * h + inter) * 4  # the linears' inputs a search keeps
        dev += own.token_bytes * calib.seqlen  # a backward pass through whole windows (learned rotations)
    p = run.evaluation.ppl
    windows = p.max_windows or DEFAULT_EVAL_WINDOWS
    eval_hidden = windows * p.seqlen * h * b
    eval_peak = p.batch_size * p.seqlen * (vocab * 4 * 2 + (3 * inter + 4 * h) * 4)  # logits, their log-softmax
    # calibration buffers live while quantizing, evaluation hidden states afterwards: never both
    dev += max(acts, eval_hidden) + eval_peak
    if device.type != "cuda":
        return MemoryEstimate(host + dev, 0)
    return MemoryEstimate(host, dev)


def working_memory(run: Any, config: Any) -> WorkingMemory:
    """What the run's method says it holds under the run's options (nothing for a method not installed here)."""
    from harness.errors import UnknownNameError
    from harness.registry import get_method

    try:
        cls = get_method(run.method)
    except UnknownNameError:
        return WorkingMemory()
    return cls(run.config if isinstance(run.config, cls.config_class) else None).working_memory(config)


def available(device: torch.device) -> tuple[int, int | None]:
    """(available host bytes from /proc/meminfo, free CUDA bytes or None)."""
    host = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
    except OSError:
        host = 0
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" and torch.cuda.is_available() else None
    return host, free


def check_fits(run: Any) -> MemoryEstimate | None:
    """Raise ResourceUnavailableError (one line) when the machine cannot hold ``run``'s estimated peak."""
    from harness.models import resolve_device

    est = estimate(run)
    if est is None:
        return None
    host, free = available(resolve_device(run.device))
    if host and est.host_bytes > host:
        raise ResourceUnavailableError(f"{run.label}: needs about {est.host_bytes / GB:.1f} GB of host memory, "
                                       f"{host / GB:.1f} GB available; lower calibration.samples/seqlen or use a larger machine")
    if free is not None and est.device_bytes > free:
        raise ResourceUnavailableError(f"{run.label}: needs about {est.device_bytes / GB:.1f} GB of device memory, "
                                       f"{free / GB:.1f} GB free; lower calibration.samples/seqlen or use a larger GPU")
    return est
