"""Provenance recorded with every result: versions, git revision, hardware, determinism settings.

``harness.run.execute`` adds what the run read: input fingerprints, the hub commit, the resolved dtype
and the corpus package.
"""
from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from harness.engine.allocator import allocator_provenance

PACKAGES = ("ptqbench", "torch", "transformers", "lm_eval", "datasets", "accelerate", "tokenizers", "numpy", "gguf")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=1)
def git_revision() -> dict[str, str | bool | None]:
    """The revision of the ptqbench source tree (None when not run from a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return {"revision": rev, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem,
        "gpus": gpus,
    }


def determinism() -> dict:
    """Whether this process asked torch for deterministic kernels (CUDA results depend on it; CPU runs
    are bit-identical for a seed either way, tests/harness/test_determinism.py)."""
    return {"torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def provenance() -> dict:
    packages = package_versions()
    return {"packages": packages, "code_version": packages.get("ptqbench"), "git": git_revision(),
            "hardware": hardware(), "determinism": determinism(), "allocator": allocator_provenance(), "argv": sys.argv}
