"""Evaluating a model: perplexity (whole model or block by block), lm-eval zero-shot, and
evaluating a saved (exported) model the way a sweep's run is evaluated.
"""
