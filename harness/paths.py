"""Where ptqbench keeps prepared models and data.

``$PTQBENCH_HOME`` if set (the Makefile sets it to ``.cache/`` in the checkout), else
``$XDG_CACHE_HOME/ptqbench`` or ``~/.cache/ptqbench``. Nothing else is written outside a run's
output directory.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    if env := os.environ.get("PTQBENCH_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "ptqbench"
