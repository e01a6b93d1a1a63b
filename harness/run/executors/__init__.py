"""Executors: where a sweep's runs execute. ``executor.kind`` in the YAML or ``--executor`` picks one.

- ``local``: one run after another in the driver process (the default).
- ``ray``: each run is a Ray task; a local cluster, or an existing one via ``address``.
- ``slurm``: each run is a Slurm job submitted with submitit.

Whatever the kind, results come back to the driver, which stores each one the moment it arrives
(``harness.run.sweep.run_sweep``). Ray and submitit are optional extras, imported only when chosen.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.run.executor_config import ExecutorConfig
    from harness.run.executors.base import Executor

_MODULES = {"local": "harness.run.executors.local", "ray": "harness.run.executors.ray_executor", "slurm": "harness.run.executors.slurm"}


def make_executor(config: ExecutorConfig, out_dir: str | Path, *, progress: bool = True, **kwargs: Any) -> Executor:
    """The executor for ``config.kind`` (imports its module, and its optional dependency, only now)."""
    module = importlib.import_module(_MODULES[config.kind])
    return module.EXECUTOR(config, out_dir, progress=progress, **kwargs)
