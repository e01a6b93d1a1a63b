"""The block-wise calibration engine shared by OmniQuant-style and QLLM.

Protocol (OmniQuant / QLLM official code): embed the calibration tokens to get the inputs of
decoder block 0, then go through the blocks in order. For each block (or group of blocks):

1. move it to the compute device (float32; everything else stays on CPU),
2. teacher targets = FP block on the FP inputs; during this pass the engine records what the method
   asked for (``record=``: per-channel max|X| and the first samples of named linears' inputs), so
   no method needs an FP pass of its own,
3. the method's ``process(job)`` quantizes the block and may train its quantization parameters
   against the targets, starting from the inputs the *quantized* model produced so far,
4. the quantized block's outputs on the quantized inputs become the next block's student inputs,
   and the targets become the next block's FP inputs,
5. the block goes back to CPU in its original dtype.

So at any moment one block, its parameters and three (samples, seqlen, hidden) activation tensors
live on the device: peak memory does not grow with depth.

``train()`` is the shared optimisation loop: AdamW, per-block epochs, seeded sample order,
optional linear learning-rate decay, bf16 autocast on CUDA, and a NaN/inf loss stops the run with
an error naming the block and epoch.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from harness.adapter import LlamaAdapter, get_adapter
from harness.calibration_stats import InputRecord, recording_inputs
from harness.errors import TrainingDivergedError

log = logging.getLogger(__name__)


@dataclass
class BlockJob:
    """One step of the engine: the blocks being quantized and their calibration activations.

    Tensors are (samples, seqlen, hidden) float32 on ``device``.
    """

    index: int  # index of the first block of this job
    layers: list[nn.Module]
    fp_inputs: torch.Tensor  # what the FP model feeds these blocks
    q_inputs: torch.Tensor  # what the model quantized so far feeds them
    targets: torch.Tensor  # FP blocks' outputs on fp_inputs: the teacher
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    adapter: LlamaAdapter
    device: torch.device
    model_config: Any = None
    # per block of this job: the inputs of the submodules named in run_blockwise(record=...) during
    # the teacher pass (FP blocks on FP inputs)
    inputs: list[InputRecord] = field(default_factory=list)

    @property
    def label(self) -> str:
        last = self.index + len(self.layers) - 1
        return f"block {self.index}" if last == self.index else f"blocks {self.index}-{last}"

    def attention_geometry(self) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, head_dim) of these blocks, from the model config."""
        return self.adapter.attention_geometry(self.model_config)

    def forward(self, x: torch.Tensor, layers: Iterable[nn.Module] | None = None) -> torch.Tensor:
        """Run ``x`` (batch, seqlen, hidden) through ``layers`` (default: all of this job's)."""
        for layer in self.layers if layers is None else layers:
            x = self.adapter.run_layer(layer, x, self.position_embeddings)
        return x

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor, layers: Iterable[nn.Module] | None = None, batch_size: int = 1) -> torch.Tensor:
        """``forward`` over every sample in mini-batches, without gradients."""
        layers = list(self.layers if layers is None else layers)
        return torch.cat([self.forward(x[i : i + batch_size], layers) for i in range(0, len(x), batch_size)])


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (the official scripts train in mixed precision); a no-op on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def embed_calibration(model: nn.Module, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Inputs of decoder block 0 for the calibration tokens, float32 on ``device``."""
    embed = get_adapter(model).embed(model)
    original = next(embed.parameters()).device
    embed.to(device)
    hidden = torch.cat([embed(tokens[i : i + 1].to(device)).float() for i in range(len(tokens))])
    embed.to(original)
    return hidden


def run_blockwise(
    model: nn.Module,
    tokens: torch.Tensor,
    process: Callable[[BlockJob], dict | None],
    *,
    device: torch.device,
    blocks_per_job: int = 1,
    record: tuple[str, ...] = (),
    keep_samples: int = 0,
    desc: str = "blocks",
    progress: bool = True,
) -> list[dict]:
    """Quantize ``model`` block by block with ``process``; return each job's stats (with its index).

    ``record`` names submodules of a block (``"self_attn.q_proj"``) whose inputs the teacher pass
    records into ``job.inputs`` (per-channel max |X| and the first ``keep_samples`` samples).

    ``process(job)`` must leave ``job.layers`` in their quantized state (e.g. frozen
    ``QuantLinear``s); the engine then computes the student inputs of the next job from them.
    Every job's stats also get ``output_mse``: the mean squared error between the quantized
    blocks' outputs on the quantized inputs and the FP targets (what the next job starts from).
    """
    if blocks_per_job < 1:
        raise ValueError("blocks_per_job must be >= 1")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    fp_x = embed_calibration(model, tokens, device)
    q_x = fp_x.clone()
    position_embeddings = adapter.position_embeddings(model, fp_x[:1])
    position_embeddings = tuple(t.to(device).float() for t in position_embeddings)
    all_stats: list[dict] = []
    bar = tqdm(range(0, len(layers), blocks_per_job), desc=desc, disable=not progress, unit="job")
    for start in bar:
        group = list(layers[start : start + blocks_per_job])
        dtypes = [next(layer.parameters()).dtype for layer in group]
        for layer in group:
            layer.to(device=device, dtype=torch.float32)
        job = BlockJob(start, group, fp_x, q_x, torch.empty(0), position_embeddings, adapter, device, model.config)
        with contextlib.ExitStack() as stack:
            job.inputs = [stack.enter_context(recording_inputs(layer, record, keep_samples)) for layer in group]
            job.targets = job.forward_all(fp_x)
        stats = process(job) or {}
        next_q = job.forward_all(q_x)
        stats.setdefault("output_mse", mean_squared_error(next_q, job.targets))
        for layer, dtype in zip(group, dtypes):
            # gradients a method's training left on the block's own weights would otherwise stay
            # in CPU memory for every block already done, so memory would grow with depth
            for p in layer.parameters():
                p.grad = None
            layer.to(device="cpu", dtype=dtype)
        fp_x, q_x = job.targets, next_q
        all_stats.append({"block": start, **stats})
        if "loss" in stats:
            bar.set_postfix(loss=f"{stats['loss']:.3g}")
        del job
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return all_stats


@torch.no_grad()
def mean_squared_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """MSE of two (samples, seqlen, hidden) tensors, one sample at a time (no full-size temporary)."""
    total = sum(F.mse_loss(x.float(), y.float(), reduction="sum").item() for x, y in zip(a, b))
    return total / a.numel()


def train(
    parameter_groups: list[dict],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    n_samples: int,
    *,
    epochs: int,
    batch_size: int = 1,
    weight_decay: float = 0.0,
    linear_decay: bool = False,
    seed: int = 0,
    label: str = "block",
    device: torch.device = torch.device("cpu"),
    progress: bool = False,
) -> list[float]:
    """Minimise ``loss_fn(sample_indices)`` with AdamW; return the mean loss of every epoch.

    ``parameter_groups`` are AdamW groups (each with its own ``lr``). Sample order is shuffled per
    epoch with a generator seeded by ``seed``, so a run is reproducible.
    """
    params = [p for group in parameter_groups for p in group["params"]]
    if not params or epochs == 0:
        return []
    optimizer = torch.optim.AdamW(parameter_groups, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n_samples / batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, (lambda s: 1.0 - s / total) if linear_decay else (lambda s: 1.0))
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in tqdm(range(epochs), desc=f"train {label}", disable=not progress, leave=False):
        order = torch.randperm(n_samples, generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            with autocast(device):
                loss = loss_fn(idx)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"{label}, epoch {epoch}: loss is {loss.item()} (not finite); "
                                            "lower the learning rate or check the calibration data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
        log.debug("%s epoch %d loss %.6g", label, epoch, history[-1])
    return history
