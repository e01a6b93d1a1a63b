"""Evaluation of a model: perplexity on pre-cut token windows (see ``harness.data.windows`` for the protocol),
and ``evaluate_model``, everything a run's ``evaluation:`` section asks for (a sweep's runs and
``ptqbench eval`` both go through it, so their metrics mean the same thing).

``perplexity`` runs the plain forward of the whole model; ``perplexity_blockwise`` gives the same
number one decoder block at a time (lazy models, models larger than the device).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapter import get_adapter
from harness.engine.blockwise import embed_calibration, model_dtype
from harness.models.lazy import dispatch, materialized
from harness.progress import Progress
from harness.runtime import gc_frozen
from harness.runtime import kill_point

if TYPE_CHECKING:
    from harness.evaluation.config import EvaluationConfig


def _perplexity_of(logits_of: Callable[[torch.Tensor, slice], torch.Tensor], windows: torch.Tensor, device: torch.device,
                   batch_size: int, batches: Iterable[int]) -> float:
    """exp(mean next-token NLL) over all windows; ``logits_of(batch, rows)`` gives each batch's logits.

    Every window predicts its tokens 2..seqlen, so this equals the papers'
    ``exp(sum(loss_i * seqlen) / (n * seqlen))``: every window contributes the same number of predictions.
    """
    total_nll, total_tokens = 0.0, 0
    for start in batches:
        rows = slice(start, start + batch_size)
        batch = windows[rows].to(device)
        logits = logits_of(batch, rows)[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, device: torch.device, batch_size: int = 1,
               desc: str = "perplexity", progress: bool = True) -> float:
    """exp(mean next-token NLL) over all windows, with the plain forward of the whole model."""
    model.eval()
    batches = Progress(range(0, len(windows), batch_size), desc=desc, enabled=progress, unit="batch", leave=False)
    return _perplexity_of(lambda batch, _rows: model(batch, use_cache=False).logits, windows, device, batch_size, batches)


@torch.no_grad()
def perplexity_blockwise(model: nn.Module, windows: torch.Tensor, *, device: torch.device, batch_size: int = 1,
                         desc: str = "perplexity", progress: bool = True) -> float:
    """:func:`perplexity` computed block by block: all windows through block i, then block i+1.

    Only one decoder block is on ``device`` (and, for a lazy model, in host memory) at a time,
    plus the windows' hidden states (windows x seqlen x hidden, in the model's dtype). Blocks run
    in their own dtype, as in the plain forward, so the two agree to rounding.
    """
    model.eval()
    adapter = get_adapter(model)
    dtype = model_dtype(model)
    embed = adapter.embed(model)
    hidden = torch.empty((*windows.shape, embed.embedding_dim), dtype=dtype, device=device)
    embed_calibration(model, windows, device, out=hidden)
    position_embeddings = adapter.position_embeddings_to(
        adapter.position_embeddings(model, torch.empty(1, windows.shape[1], 1, dtype=dtype)), device)
    layers = adapter.layers(model)
    with gc_frozen():  # each released block collects garbage
        for i in Progress(range(len(layers)), desc=desc, enabled=progress, unit="block", leave=False):
            with materialized(model, i, [layers[i]]) as (layer,):
                layer.to(device)
                for start in range(0, len(windows), batch_size):
                    rows = slice(start, start + batch_size)
                    hidden[rows] = adapter.run_layer(layer, hidden[rows], position_embeddings)
                layer.to("cpu")
            if i == len(layers) // 2:
                kill_point("eval:mid")
    norm, head = adapter.final_norm(model), adapter.lm_head(model)
    homes = [next(m.parameters()).device for m in (norm, head)]
    norm.to(device), head.to(device)
    ppl = _perplexity_of(lambda _batch, rows: head(norm(hidden[rows])), windows, device, batch_size,
                         range(0, len(windows), batch_size))
    norm.to(homes[0]), head.to(homes[1])
    return ppl


def evaluate_model(model: nn.Module, tokenizer: Any, evaluation: EvaluationConfig, *, device: torch.device,
                   label: str = "", progress: bool = True) -> dict[str, Any]:
    """``metrics`` of a run: perplexity per dataset (+ windows scored) and, when tasks are listed, lm-eval zero-shot."""
    from harness.data.windows import eval_windows
    from harness.evaluation.zeroshot import zeroshot

    metrics: dict[str, Any] = {"ppl": {}}
    p = evaluation.ppl
    for name in p.datasets:
        windows = eval_windows(name, tokenizer, p.seqlen, p.max_windows)
        metrics["ppl"][name] = perplexity_blockwise(model, windows, device=device, batch_size=p.batch_size,
                                                    desc=f"ppl {name} ({label})", progress=progress)
        metrics.setdefault("ppl_windows", {})[name] = len(windows)
    if evaluation.zeroshot.tasks:
        # lm-eval needs the whole model: spread over the GPUs and host memory (harness.models.lazy.dispatch)
        metrics["zeroshot"] = zeroshot(dispatch(model, device), tokenizer, evaluation.zeroshot, device=device)
    return metrics
