"""The process's own machinery that every layer may call: named kill points, returning freed memory to
the OS, leaving long-lived objects out of garbage collections, and factorizations that do not depend on
the thread count.

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


@contextlib.contextmanager
def thread_count_independent(tensor: "torch.Tensor") -> Iterator[None]:
    """Run the ``with`` body on one CPU thread when ``tensor`` is on the CPU.

    LAPACK's blocked factorizations (Cholesky, LU, QR) split their panels over the threads, so their float
    rounding depends on the thread count (measured: a 576 x 576 float32 Cholesky differs by 2.4e-7 between 1
    and 2 threads; the matmuls and forward passes of smollm2-135m's blocks are bit-identical). A difference in
    GPTQ's inverse Hessian can flip a rounding decision, and each flip changes the error every later column of
    the layer absorbs, so GPTQ's perplexity moved with the core count. One thread gives every machine the 1-thread result; the factorizations are
    O(C^3) on C x C matrices (C <= 28672 for LLaMA-2-70B's MLP), small beside the passes that feed them.
    CUDA factorizations are left as they are.
    """
    with torch_threads(1 if tensor.device.type == "cpu" else None):
        yield


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the ``with`` body (None: unchanged)."""
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
