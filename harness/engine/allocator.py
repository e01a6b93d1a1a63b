"""The host allocator a run's process starts with (``executor.host_allocator``).

glibc's malloc serves buffers below its mmap threshold from the heap, and raises that threshold
(up to 32 MB) each time a larger mapped buffer is freed. Block-wise quantization frees weight- and
activation-sized buffers all the time, so after the first few the heap holds them, and freed
chunks in it stay resident until they happen to be reused: on the scale benchmark (``ptqbench
bench-scale``) that retention is most of the gap between QLLM's live tensors and its peak RSS.

``compact`` starts each run's process with two glibc tunables (glibc >= 2.35; older versions ignore
the one they do not know):

- ``glibc.malloc.mmap_threshold=1048576``: every buffer of 1 MB or more is its own mapping, returned
  to the OS when freed (a fixed threshold also turns the dynamic raising off);
- ``glibc.malloc.hugetlb=1``: those mappings are backed by transparent huge pages (where the kernel's
  THP mode is ``madvise`` or ``always``), so mapping fresh buffers takes 512x fewer page faults.
  Without it the threshold alone cost 42% more time on the benchmark's QLLM run; with it, 12%.

Tunables are read once, when a process starts, so this cannot change the process it is called in:
the executors put it into the environment of the processes they start (local runs with
``isolate``, Slurm jobs, Ray tasks). Results do not depend on it (the allocator decides where
buffers live, not what they hold); every record says what its process ran with (provenance).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

TUNABLES = "GLIBC_TUNABLES"
ALLOCATORS = {"default": "", "compact": "glibc.malloc.mmap_threshold=1048576:glibc.malloc.hugetlb=1"}


def allocator_env(kind: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment variables a process must start with to get allocator ``kind`` ({} for the default).

    Tunables the user already set are kept, before ours (glibc takes the last of a repeated name, so ours win).
    """
    tunables = ALLOCATORS[kind]
    if not tunables:
        return {}
    current = environ.get(TUNABLES, "")
    return {TUNABLES: f"{current}:{tunables}" if current else tunables}


def allocator_provenance() -> dict[str, str | None]:
    """What this process's allocator was started with: glibc's tunables and any ``MALLOC_*`` variables."""
    return {TUNABLES: os.environ.get(TUNABLES),
            **{name: value for name, value in sorted(os.environ.items()) if name.startswith("MALLOC_")}}
