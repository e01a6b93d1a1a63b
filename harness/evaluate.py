"""Evaluation of a model: perplexity on pre-cut token windows (see ``harness.data`` for the protocol),
and ``evaluate_model``, everything a run's ``evaluation:`` section asks for (a sweep's runs and
``ptqbench eval`` both go through it, so their metrics mean the same thing)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from harness.config import EvaluationConfig


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, device: torch.device, batch_size: int = 1,
               desc: str = "perplexity", progress: bool = True) -> float:
    """exp(mean next-token NLL) over all windows; every window predicts its tokens 2..seqlen.

    This equals the papers' ``exp(sum(loss_i * seqlen) / (n * seqlen))`` because every window
    contributes the same number of predictions.
    """
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def evaluate_model(model: nn.Module, tokenizer: Any, evaluation: EvaluationConfig, *, device: torch.device,
                   label: str = "", progress: bool = True) -> dict[str, Any]:
    """``metrics`` of a run: perplexity per dataset (+ windows scored) and, when tasks are listed, lm-eval zero-shot."""
    from harness.data import eval_windows
    from harness.zeroshot import zeroshot

    metrics: dict[str, Any] = {"ppl": {}}
    p = evaluation.ppl
    for name in p.datasets:
        windows = eval_windows(name, tokenizer, p.seqlen, p.max_windows)
        metrics["ppl"][name] = perplexity(model, windows, device=device, batch_size=p.batch_size,
                                          desc=f"ppl {name} ({label})", progress=progress)
        metrics.setdefault("ppl_windows", {})[name] = len(windows)
    if evaluation.zeroshot.tasks:
        metrics["zeroshot"] = zeroshot(model, tokenizer, evaluation.zeroshot, device=device)
    return metrics
