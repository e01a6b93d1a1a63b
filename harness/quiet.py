"""``ptqbench -q``: no progress bars anywhere, lm-eval's and Hugging Face's included, and only warnings.

tqdm reads ``TQDM_DISABLE`` once at import and lm-eval passes ``disable=False`` explicitly, so the
bars are switched off by wrapping ``tqdm.__init__`` (every subclass, ``tqdm.auto`` included, goes
through it). ``PTQBENCH_QUIET=1`` is left in the environment so run processes started later
(the local executor's, Ray workers, Slurm jobs) silence themselves the same way.
"""
from __future__ import annotations

import logging
import os

QUIET_ENV = "PTQBENCH_QUIET"


def silence_progress() -> None:
    from tqdm import std

    os.environ.update({QUIET_ENV: "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    init = std.tqdm.__init__
    if not getattr(init, "_ptqbench_quiet", False):
        def quiet_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            kwargs["disable"] = True
            init(self, *args, **kwargs)

        quiet_init._ptqbench_quiet = True  # type: ignore[attr-defined]
        std.tqdm.__init__ = quiet_init  # type: ignore[method-assign]
    for name in ("lm-eval", "lm_eval", "datasets", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def quiet_requested() -> bool:
    return os.environ.get(QUIET_ENV) == "1"
