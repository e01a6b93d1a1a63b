"""The Ray executor: each run is a Ray task; results are collected with ``ray.wait`` as they finish.

``executor.ray.address`` (or ``--ray-address``, or ``$RAY_ADDRESS``) joins an existing cluster
("auto" on a cluster node, "ray://head:10001" through Ray Client); without one a local cluster is
started for the sweep and shut down after it. Each task asks for ``num_cpus`` and ``num_gpus``
(1 by default when the cluster has GPUs), and for host ``memory`` when ``executor.resources``
gives its model ``mem_gb`` (Ray then places it only where that much is unreserved); resources
entries override the CPUs and GPUs per model too. Tasks are named like Slurm jobs
(``ptqbench-<model>-<method>-<bits>-s<seed>``, shown in ``ray list tasks`` and the dashboard).
Ray's own retries are off: the driver retries, so every failed attempt is reported with its
error, whether the task raised or its worker died.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import harness
from harness.engine.allocator import allocator_env
from harness.errors import ResourceUnavailableError
from harness.run.executors.base import Executor, Outcome, require
from harness.run.execute import RunSpec

log = logging.getLogger(__name__)


class RayExecutor(Executor):
    kind = "ray"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ray = require("ray", "ray")
        opts = self.config.ray
        self._owns_cluster = not self.ray.is_initialized()  # a test or notebook may have connected already
        if self._owns_cluster:
            # RAY_ADDRESS is how `ray job submit` tells a driver where its cluster is.
            address = opts.address or os.environ.get("RAY_ADDRESS")
            init: dict = {"address": address, "runtime_env": dict(opts.runtime_env) or None}
            if address is None:
                # "local" always starts a fresh cluster (never a stray one found on this machine); its workers
                # import harness/ and methods/ from this checkout.
                root = str(Path(harness.__file__).resolve().parent.parent)
                path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
                init.update(address="local", num_cpus=opts.local_num_cpus, include_dashboard=False,
                            runtime_env={"env_vars": {"PYTHONPATH": path}, **opts.runtime_env})
            log.info("ray: %s", f"joining {address}" if address else f"starting a local cluster ({opts.local_num_cpus} CPUs)")
            try:
                self.ray.init(**init)
            except (ConnectionError, TimeoutError) as err:
                raise ResourceUnavailableError(f"executor.ray.address: cannot reach Ray at {address!r}: {err}") from None
        gpus = opts.num_gpus
        if gpus is None:
            gpus = 1 if self.ray.cluster_resources().get("GPU", 0) > 0 else 0
        self.num_gpus = gpus
        log.info("ray: each run asks for %s CPU(s) and %s GPU(s) unless executor.resources say otherwise", opts.num_cpus, gpus)
        self._remote = self.ray.remote(self.task)

    def auto_device(self) -> str | None:
        return "cuda" if self.num_gpus > 0 else "cpu"  # Ray hides GPUs from tasks that asked for none

    def requested(self, run: RunSpec) -> dict[str, Any]:
        r = self.config.resources_for(run.model, run.bits.name)
        return {"task_name": f"ptqbench-{run.slug}", "gpus": self.num_gpus if r.gpus is None else r.gpus,
                "cpus": r.cpus or self.config.ray.num_cpus, "mem_gb": r.mem_gb}

    def submit(self, run: RunSpec) -> Hashable:
        req = self.requested(run)
        options: dict[str, Any] = dict(name=req["task_name"], num_cpus=req["cpus"], num_gpus=req["gpus"], max_retries=0)
        if req["mem_gb"] is not None:
            options["memory"] = req["mem_gb"] * 2**30  # Ray's memory resource is in bytes
        if env := allocator_env(self.config.host_allocator):
            options["runtime_env"] = {"env_vars": env}  # merged with the job's env_vars; a worker started with them
        return self._remote.options(**options).remote(run, False)  # per-run bars from many workers would interleave

    def wait(self, handles: list[Hashable]) -> list[tuple[Hashable, Outcome]]:
        ready, _ = self.ray.wait(handles, num_returns=1)
        finished = []
        for ref in ready:
            try:
                outcome = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as err:  # the task raised; report its own error, not Ray's wrapper
                cause = err.cause if isinstance(err.cause, BaseException) else err
                outcome = Outcome(error=f"{cause.__class__.__name__}: {cause}".splitlines()[0], traceback=str(err))
            except self.ray.exceptions.RayError as err:  # worker died, node lost, task cancelled
                outcome = Outcome.from_exception(err)
            finished.append((ref, outcome))
        return finished

    def close(self) -> None:
        if self._owns_cluster and self.ray.is_initialized():
            self.ray.shutdown()


EXECUTOR = RayExecutor
