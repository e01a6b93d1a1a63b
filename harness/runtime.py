"""The process's own machinery that every layer may call: named kill points, returning freed memory to
the OS, and leaving long-lived objects out of garbage collections.

Named kill points: where the durability tests kill a real run, deterministically, without sleeps.

``PTQBENCH_TEST_KILL_AT=<point>`` makes the process that reaches ``<point>`` send itself SIGKILL
(or the signal named by ``PTQBENCH_TEST_KILL_SIGNAL``, e.g. ``SIGUSR2``, the one Slurm sends
through submitit to preempt a job or warn it of its time limit). The points, in a run's order:

==================  ============================================================================
``mid:N``           block-wise engine: the group starting at block N was processed, nothing of it written
``block:N``         block-wise engine: right after the checkpoint of the group starting at block N
``eval:mid``        evaluation: perplexity has run half of the decoder blocks
``eval:done``       evaluation finished, the run's record not yet returned
``result:before``   sweep driver: the record came back, the result file not yet written
``result:written``  sweep driver: the result is stored, the run's work directory not yet removed
``remove:mid``      the work directory renamed aside and half deleted (``harness.run.workdir.discard``)
==================  ============================================================================

Unset (always, outside the tests) each point costs one dictionary lookup.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
from collections.abc import Iterator

log = logging.getLogger(__name__)

KILL_ENV = "PTQBENCH_TEST_KILL_AT"
KILL_SIGNAL_ENV = "PTQBENCH_TEST_KILL_SIGNAL"


def kill_point(point: str) -> None:
    """Signal this process when ``PTQBENCH_TEST_KILL_AT`` names ``point``."""
    if os.environ.get(KILL_ENV) == point:
        sig = signal.Signals[os.environ.get(KILL_SIGNAL_ENV, "SIGKILL")]
        log.warning("%s=%s: sending %s to this process", KILL_ENV, point, sig.name)
        os.kill(os.getpid(), sig)


def release_freed_memory() -> None:
    """Collect garbage and, on glibc, return freed heap pages to the OS (malloc_trim)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Objects that exist now are left out of garbage collections until the ``with`` ends (``gc.freeze``).

    For loops that release a block each step (``release_freed_memory`` collects): a full collection scanning
    every object of the loaded model and tokenizer cost 0.23 s a block, a quarter of GPTQ's time. What the
    blocks create and drop in the body is still collected; what existed before (the model's skeleton, the
    tokenizer, the libraries' objects) outlives the body anyway.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
