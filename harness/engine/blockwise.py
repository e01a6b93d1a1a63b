"""The block-wise calibration engine shared by every block-wise method (OmniQuant-style, QLLM, GPTQ, AWQ, ...).

Protocol (OmniQuant / QLLM official code): embed the calibration tokens to get the inputs of
decoder block 0, then go through the blocks in order. For each block (or group of blocks):

1. load it (lazy models, ``harness.models.lazy``) and move it to the compute device (float32; everything
   else stays on CPU), and let the method change its structure (``hooks.before``),
2. teacher targets = FP block on the FP inputs; during this pass the engine records what the method
   asked for (``hooks.record``: per-channel max|X| and the first samples of named linears' inputs), so
   no method needs an FP pass of its own,
3. the method's ``hooks.solve(job)`` quantizes the block and may train its quantization parameters
   against the targets, starting from the inputs the *quantized* model produced so far,
4. the quantized block's outputs on the quantized inputs become the next block's student inputs
   (``hooks.after`` sees them), and the targets become the next block's FP inputs,
5. the block goes back to CPU in its original dtype (a lazy model's is written to the work
   directory and released).

What a method can ask of the engine is its ``BlockHooks`` (``harness.engine.hooks``), so the engine's
signature stays the same whatever a method needs. At any moment one block, its parameters and three
preallocated (samples, seqlen, hidden) activation buffers in the model's dtype live on the device (or
the buffers in pinned host memory when they do not fit, streamed a batch at a time): peak memory does
not grow with depth.

``train()`` is the shared optimisation loop: AdamW, per-block epochs, seeded (or no) shuffling,
optional linear or cosine learning-rate decay, bf16 autocast on CUDA, and a NaN/inf loss stops the run with
an error naming the block and epoch.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from harness.adapter import get_adapter
from harness.engine.calibration_stats import recording_inputs
from harness.engine.checkpoint import Checkpoint, EngineState
from harness.engine.hooks import BlockHooks, BlockJob
from harness.models.lazy import BlockStore, block_store, embedding_and_head_offloaded, materialized
from harness.errors import TrainingDivergedError
from harness.progress import Progress
from harness.quant.attention import register as register_attention
from harness.quant.qlinear import quantizers_disabled
from harness.runtime import gc_frozen, kill_point

log = logging.getLogger(__name__)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (the official scripts train in mixed precision); a no-op on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def activation_home(device: torch.device, nbytes: int, buffers: int = 3) -> torch.device:
    """Where the engine keeps its activation buffers: the device when ``buffers`` of ``nbytes`` fit in
    half its free memory, else host memory (streamed to the device a batch at a time)."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if buffers * nbytes <= free // 2 else torch.device("cpu")


def activation_buffer(shape: tuple[int, ...], dtype: torch.dtype, home: torch.device, device: torch.device) -> torch.Tensor:
    """An uninitialised activation buffer; pinned when on the host of a CUDA run (fast async copies)."""
    return torch.empty(shape, dtype=dtype, device=home, pin_memory=home.type == "cpu" and device.type == "cuda")


@torch.no_grad()
def embed_calibration(model: nn.Module, tokens: torch.Tensor, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inputs of decoder block 0 for the calibration tokens (default: float32 on ``device``), written into ``out``."""
    embed = get_adapter(model).embed(model)
    original = next(embed.parameters()).device
    embed.to(device)
    if out is None:
        out = torch.empty((*tokens.shape, embed.embedding_dim), dtype=torch.float32, device=device)
    for i in range(len(tokens)):
        out[i : i + 1] = embed(tokens[i : i + 1].to(device)).to(out.dtype)
    embed.to(original)
    return out


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's weights (its embedding's: blocks of a lazy model are not loaded)."""
    return get_adapter(model).embed(model).weight.dtype


def run_blockwise(model: nn.Module, tokens: torch.Tensor | None, hooks: BlockHooks, *, device: torch.device,
                  desc: str = "blocks", progress: bool = True) -> list[dict]:
    """Quantize ``model`` block group by block group with ``hooks`` (``harness.engine.hooks``); return each
    group's stats (``hooks.solve``'s, with the index of its first block).

    ``hooks.solve(job)`` must leave ``job.layers`` in their quantized state (e.g. frozen ``QuantLinear``s);
    the engine then computes the student inputs of the next group from them. With the teacher pass, every
    group's stats also get ``output_mse``: the mean squared error between the quantized blocks' outputs on
    the quantized inputs and the FP targets (what the next group starts from). ``tokens=None`` walks the
    blocks without any pass or activation buffer (a method that needs no data).

    On a lazy model (``harness.models.lazy``) each group is loaded before its job and written to the work
    directory and released after it, and the engine checkpoints after every group
    (``harness.engine.checkpoint``) with ``hooks.state``: a killed run continues where it stopped.
    While the jobs run, a lazy model's input embedding and ``lm_head`` weight are on the meta device
    (``harness.models.lazy.embedding_and_head_offloaded``): the hooks must not use them; they are back when this returns.
    """
    hooks.check(has_data=tokens is not None)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    per_job = hooks.blocks_per_job
    fp_x, q_x, targets, position_embeddings = _activations(model, tokens, device) if tokens is not None else (None,) * 4
    teacher = hooks.teacher and tokens is not None
    store = block_store(model)
    ckpt = (Checkpoint(store.work.parent / "engine", store.work, key=store.run_key)
            if store is not None and store.work is not None else None)
    all_stats, first = _resume(ckpt, store, layers, fp_x, q_x, hooks.state)
    bar = Progress(range(first, len(layers), per_job), desc=desc, enabled=progress, unit="group",
                   initial=len(range(0, first, per_job)))  # groups a killed attempt finished
    with gc_frozen(), embedding_and_head_offloaded(model):  # the embedding is not needed again until evaluation
        for start in bar:
            with materialized(model, start, list(layers[start : start + per_job]), finish=True) as group:
                dtypes = [next(layer.parameters()).dtype for layer in group]
                for layer in group:
                    layer.to(device=device, dtype=torch.float32)
                job = BlockJob(start, group, fp_x, q_x, targets, position_embeddings, adapter, device, model.config)
                hooks.before(job)
                if teacher:
                    with contextlib.ExitStack() as stack:
                        job.inputs = [stack.enter_context(recording_inputs(layer, hooks.record, hooks.keep_samples))
                                      for layer in group]
                        job.forward_all(fp_x, out=targets)
                stats = hooks.solve(job) or {}
                if q_x is not None:
                    with contextlib.nullcontext() if hooks.student_activations else quantizers_disabled(*group, weights=False):
                        job.forward_all(q_x, out=q_x)
                if teacher:
                    stats.setdefault("output_mse", mean_squared_error(q_x, targets))
                hooks.after(job)
                kill_point(f"mid:{start}")
                for layer, layer_dtype in zip(group, dtypes):
                    # gradients a method's training left on the block's own weights would otherwise stay
                    # in CPU memory for every block already done, so memory would grow with depth
                    for p in layer.parameters():
                        p.grad = None
                    layer.to(device="cpu", dtype=layer_dtype)
            if teacher:
                fp_x, targets = targets, fp_x
            all_stats.append({"block": start, **stats})
            if ckpt is not None:
                for offset, layer in enumerate(group):
                    ckpt.save_structure(start + offset, layer)
                ckpt.save(EngineState(start + len(group), fp_x, q_x, all_stats, hooks.state, torch.get_rng_state()),
                          finished=range(start, start + len(group)))
                kill_point(f"block:{start}")
            if "loss" in stats:
                bar.set_postfix(loss=f"{stats['loss']:.3g}")
            del job
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return all_stats


def _activations(model: nn.Module, tokens: torch.Tensor, device: torch.device) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The run's three activation buffers (FP inputs of block 0, student inputs, targets) and RoPE's (cos, sin).

    Three buffers for the whole run: the student inputs are overwritten in place by the next group's,
    and the targets become the next FP inputs by swapping names."""
    adapter = get_adapter(model)
    dtype = model_dtype(model)
    shape = (*tokens.shape, adapter.embed(model).embedding_dim)
    home = activation_home(device, math.prod(shape) * dtype.itemsize)
    fp_x = embed_calibration(model, tokens, device, out=activation_buffer(shape, dtype, home, device))
    q_x = activation_buffer(shape, dtype, home, device)
    q_x.copy_(fp_x)
    targets = activation_buffer(shape, dtype, home, device)
    position_embeddings = adapter.position_embeddings(model, fp_x[:1].float().cpu())
    return fp_x, q_x, targets, adapter.position_embeddings_to(position_embeddings, device, torch.float32)


def _resume(ckpt: Checkpoint | None, store: BlockStore | None, layers: nn.ModuleList, fp_x: torch.Tensor | None,
            q_x: torch.Tensor | None, state: dict[str, torch.Tensor]) -> tuple[list[dict], int]:
    """Restore a killed run's engine state from its checkpoint; return (finished jobs' stats, next block)."""
    saved = ckpt.load() if ckpt is not None else None
    first = saved.next_start if saved is not None else 0
    if store is not None:
        store.forget_from(first)  # blocks written after the last checkpoint are not trusted
    if saved is None:
        return [], 0
    for buffer, kept in ((fp_x, saved.fp_x), (q_x, saved.q_x)):
        if buffer is not None:
            buffer.copy_(kept)
    state.update(saved.state)
    torch.set_rng_state(saved.rng)
    register_attention()  # restored blocks may name ptqbench's attention kernels, unknown to a fresh process
    for i in range(first):
        layers[i] = ckpt.load_structure(i)
    log.info("resuming from the checkpoint: blocks 0-%d are done", first - 1)
    return saved.stats, first


@torch.no_grad()
def mean_squared_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """MSE of two (samples, seqlen, hidden) tensors, one sample at a time (no full-size temporary)."""
    total = sum(F.mse_loss(x.float(), y.to(x.device).float(), reduction="sum").item() for x, y in zip(a, b))
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
    cosine_min_lr: float | None = None,
    relative_loss: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    shuffle: bool = True,
    label: str = "block",
    device: torch.device = torch.device("cpu"),
    progress: bool = False,
) -> list[float]:
    """Minimise ``loss_fn(sample_indices)`` with AdamW; return the mean loss of every epoch.

    ``parameter_groups`` are AdamW groups (each with its own ``lr``). Sample order is shuffled per
    epoch with a generator seeded by ``seed``, so a run is reproducible; ``shuffle=False`` goes through
    the samples in order every epoch (the official OmniQuant loop). The last batch of an epoch may
    be smaller (with the default batch size 1 there is none); ``drop_last`` leaves it out, as the official
    loops do (all samples make one batch when there are fewer than ``batch_size``).

    Learning rates stay constant, decay linearly to 0 over all steps (``linear_decay``), or follow a cosine
    from each group's ``lr`` to ``cosine_min_lr`` (PyTorch's ``CosineAnnealingLR`` stepped once per step:
    FlatQuant). ``relative_loss`` backpropagates loss / loss.detach(), a gradient of the relative error of
    each step (FlatQuant's loop); the returned losses are the losses themselves either way.
    """
    params = [p for group in parameter_groups for p in group["params"]]
    if not params or epochs == 0:
        return []
    if linear_decay and cosine_min_lr is not None:
        raise ValueError("train: linear_decay and cosine_min_lr are two schedules; choose one")
    optimizer = torch.optim.AdamW(parameter_groups, weight_decay=weight_decay)
    steps_per_epoch = max(1, n_samples // batch_size) if drop_last else math.ceil(n_samples / batch_size)
    if drop_last and n_samples < batch_size:
        batch_size = n_samples
    total = epochs * steps_per_epoch
    if cosine_min_lr is not None:
        floor = cosine_min_lr
        factors = [lambda s, lr=group["lr"]: (floor + (lr - floor) * (1 + math.cos(math.pi * s / total)) / 2) / lr
                   for group in parameter_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, (lambda s: 1.0 - s / total) if linear_decay else (lambda s: 1.0))
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in tqdm(range(epochs), desc=f"train {label}", disable=not progress, leave=False):
        order = torch.randperm(n_samples, generator=generator) if shuffle else torch.arange(n_samples)
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            with autocast(device):
                loss = loss_fn(idx)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"{label}, epoch {epoch}: loss is {loss.item()} (not finite); "
                                            "lower the learning rate or check the calibration data")
            optimizer.zero_grad(set_to_none=True)
            (loss / loss.detach().clamp_min(torch.finfo(loss.dtype).tiny) if relative_loss else loss).backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
        log.debug("%s epoch %d loss %.6g", label, epoch, history[-1])
    return history
