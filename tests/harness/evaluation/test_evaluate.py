from __future__ import annotations

import math

import torch

from harness.evaluation.evaluate import perplexity


def test_perplexity_matches_the_models_own_loss(tiny_model, tiny_tokens):
    """exp of the HF causal-LM loss averaged over equal-length windows (the papers' formula)."""
    with torch.no_grad():
        losses = [tiny_model(w[None], labels=w[None]).loss.item() for w in tiny_tokens]
    expected = math.exp(sum(losses) * tiny_tokens.shape[1] / (len(losses) * tiny_tokens.shape[1]))
    for batch_size in (1, 3):
        got = perplexity(tiny_model, tiny_tokens, device=torch.device("cpu"), batch_size=batch_size, progress=False)
        assert math.isclose(got, expected, rel_tol=1e-5)


def test_random_model_is_near_uniform(tiny_model, tiny_tokens):
    ppl = perplexity(tiny_model, tiny_tokens, device=torch.device("cpu"), progress=False)
    assert 0.5 * 256 < ppl < 2 * 256  # vocab 256, small random init: close to uniform
