"""Perplexity evaluation on pre-cut token windows (see ``harness.data`` for the protocol)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


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
