"""harness.engine.allocator: the environment a run's process starts with, and that glibc acts on it."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from harness.engine.allocator import ALLOCATORS, TUNABLES, allocator_env

# A child that fills and frees a 24 MB buffer twice and reports how much memory stays resident. The
# first free (of a mapped buffer) raises glibc's dynamic mmap threshold, so by default the second
# buffer comes from the heap and stays there after its free; the compact allocator maps and unmaps both.
CHILD = r"""
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
start, size = rss(), 24 << 20
for _ in range(2):
    p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
print(rss() - start)
"""

def test_default_adds_nothing_and_compact_keeps_the_users_tunables_before_its_own():
    assert allocator_env("default", {TUNABLES: "glibc.malloc.arena_max=2"}) == {}
    assert allocator_env("compact", {}) == {TUNABLES: ALLOCATORS["compact"]}
    assert allocator_env("compact", {TUNABLES: "glibc.malloc.arena_max=2"}) == {
        TUNABLES: "glibc.malloc.arena_max=2:" + ALLOCATORS["compact"]}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tunables are glibc's")
def test_glibc_returns_freed_buffers_only_with_the_compact_allocator():
    def retained(kind: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != TUNABLES and not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", CHILD], env={**env, **allocator_env(kind, env)},
                             capture_output=True, text=True, check=True)
        return int(out.stdout)

    assert retained("default") >= 16 << 20  # the freed buffer stayed in the heap
    assert retained("compact") < 4 << 20
