"""The sweep's ``executor:`` section: where runs execute and what each run asks the cluster for.

Never part of a run's key (the executor changes where a result is computed, not the result).
Built by ``harness.schema`` as part of ``SweepConfig``; ``parse_config`` then checks that every
model and bit spec named under ``resources`` is one of the sweep's (``check_resources``).

    executor:
      kind: slurm
      slurm: {partition: gpu, gpus: 1, mem_gb: 64, time_min: 600, max_concurrent: 8}
      resources:                      # per model (and bit spec); later entries win field by field
        - {models: [llama-2-70b], gpus: 2, mem_gb: 256, time_min: 2880}
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from harness.errors import ConfigError


@dataclass(frozen=True)
class RayOptions:
    """Args:
    address: an existing cluster ("auto", "ray://head:10001"); null starts a local one.
    num_gpus: GPUs per run; null = 1 when the cluster has GPUs, else 0.
    num_cpus: CPUs per run.
    local_num_cpus: CPUs of the local cluster started when address is null.
    runtime_env: passed to ray.init (e.g. {working_dir: ., pip: [...]}) for clusters without ptqbench installed.
    """

    address: str | None = None
    num_gpus: float | None = None
    num_cpus: float = 1.0
    local_num_cpus: int = 2
    runtime_env: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"num_gpus: {self.num_gpus} is not allowed; use a number >= 0 or null")
        if self.num_cpus <= 0:
            raise ConfigError(f"num_cpus: {self.num_cpus} is not allowed; use a positive number")
        if self.local_num_cpus < 1:
            raise ConfigError(f"local_num_cpus: {self.local_num_cpus} is not allowed; use a positive integer")


@dataclass(frozen=True)
class SlurmOptions:
    """Args (submitit ``AutoExecutor`` parameters, one job per run):
    cluster: slurm (sbatch) or local (submitit's LocalExecutor: same code path minus sbatch).
    partition: Slurm partition (null = the cluster's default).
    time_min: job time limit in minutes.
    gpus: GPUs per job; cpus: CPUs per job; mem_gb: memory per job.
    extra: more sbatch options (slurm_additional_parameters), e.g. {account: proj, qos: high}.
    poll_s: seconds between checks on running jobs.
    max_concurrent: at most this many jobs queued or running at once; the driver submits the next
        run when one finishes (null = every run at once). A cap rather than a job array, because an
        array shares one resource request and one name, and runs here have their own.
    """

    cluster: Literal["slurm", "local"] = "slurm"
    partition: str | None = None
    time_min: int = 24 * 60
    gpus: int = 1
    cpus: int = 8
    mem_gb: int = 64
    extra: dict[str, Any] = field(default_factory=dict)
    poll_s: float = 10.0
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        for name in ("time_min", "cpus", "mem_gb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} is not allowed; use a positive integer")
        if self.gpus < 0:
            raise ConfigError(f"gpus: {self.gpus} is not allowed; use an integer >= 0")
        if self.poll_s <= 0:
            raise ConfigError(f"poll_s: {self.poll_s} is not allowed; use a positive number")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent: {self.max_concurrent} is not allowed; use a positive integer or null")


@dataclass(frozen=True)
class Resources:
    """What each matching run asks its Ray task or Slurm job for (one 64 GB setting cannot serve 7B and 70B).

    ``models`` / ``bits`` empty = every model / bit spec of the sweep. A field left null keeps the
    value of an earlier matching entry, else the executor's own (``slurm.gpus``, ``ray.num_gpus``...).

    Args:
    models: zoo names, hub ids or folders exactly as the sweep's ``models`` lists them.
    bits: bit specs of the sweep (e.g. [W4A4]).
    gpus: GPUs per run (Slurm --gpus-per-node, Ray num_gpus).
    cpus: CPUs per run (Slurm --cpus-per-task, Ray num_cpus).
    mem_gb: host memory per run in GiB (Slurm --mem, Ray memory).
    time_min: Slurm time limit in minutes (Ray tasks have none).
    partition: Slurm partition (e.g. a large-memory one for 70B).
    """

    models: tuple[str, ...] = ()
    bits: tuple[str, ...] = ()
    gpus: int | None = None
    cpus: int | None = None
    mem_gb: int | None = None
    time_min: int | None = None
    partition: str | None = None

    def __post_init__(self) -> None:
        if self.gpus is not None and self.gpus < 0:
            raise ConfigError(f"gpus: {self.gpus} is not allowed; use an integer >= 0 or null")
        for name in ("cpus", "mem_gb", "time_min"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: {value} is not allowed; use a positive integer or null")

    def matches(self, model: str, bits: str) -> bool:
        return (not self.models or model in self.models) and (not self.bits or bits in self.bits)

    def over(self, earlier: Resources) -> Resources:
        """``earlier`` with every field this entry sets replaced (``models``/``bits`` are not resources)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("models", "bits")}
        return replace(earlier, **{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class ExecutorConfig:
    """Where the runs execute (never part of a run's key). See harness/run/executors/.

    Args:
    kind: local (one after another on this machine), ray (a Ray task per run) or slurm (a job per run).
    max_retries: ray and slurm: new attempts after a run fails (error or lost worker/job) before it is
        recorded under failed/. local never retries within a sweep (its failures are deterministic).
    isolate: local: each run in a fresh process of its own, so its peak memory is its own (default);
        false runs them in the driver process (kill -9 of the driver then stops the run itself, and
        tokenized data is shared across runs).
    resources: per-model (and bit spec) requests for Ray tasks and Slurm jobs (``Resources``);
        the local executor ignores them.
    host_allocator: default, or compact: each run's process starts with glibc tunables that give
        freed buffers of 1 MB or more back to the OS at once (less peak host memory for more time;
        see harness/engine/allocator.py). local needs isolate: true for it (the driver has started already).
    """

    kind: Literal["local", "ray", "slurm"] = "local"
    max_retries: int = 1
    isolate: bool = True
    ray: RayOptions = field(default_factory=RayOptions)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    resources: tuple[Resources, ...] = ()
    host_allocator: Literal["default", "compact"] = "default"

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries: {self.max_retries} is not allowed; use an integer >= 0")
        if self.host_allocator != "default" and self.kind == "local" and not self.isolate:
            raise ConfigError(f"host_allocator: {self.host_allocator} needs isolate: true with kind: local "
                              "(the allocator is set when a run's process starts; the driver's has)")

    def resources_for(self, model: str, bits: str) -> Resources:
        """The merged request of every entry matching one run (fields still null: the executor's defaults)."""
        merged = Resources()
        for entry in self.resources:
            if entry.matches(model, bits):
                merged = entry.over(merged)
        return merged


def check_resources(executor: ExecutorConfig, models: tuple[str, ...], sweep_bits: set[str],
                    bit_names: Callable[[tuple[str, ...], str], tuple[str, ...]]) -> ExecutorConfig:
    """``executor`` with each ``resources`` entry's bit specs canonical (``bit_names(texts, where)``),
    after checking that the entry asks for something and names only the sweep's models and bit specs."""
    entries = []
    for i, entry in enumerate(executor.resources):
        where = f"executor.resources[{i}]"
        if entry.over(Resources()) == Resources():
            raise ConfigError(f"{where}: asks for nothing; set gpus, cpus, mem_gb, time_min or partition")
        for j, model in enumerate(entry.models):
            if model not in models:
                raise ConfigError(f"{where}.models[{j}]: {model!r} is not a model of this sweep; use one of {list(models)}")
        names = bit_names(entry.bits, f"{where}.bits") if entry.bits else ()
        for j, name in enumerate(names):
            if name not in sweep_bits:
                raise ConfigError(f"{where}.bits[{j}]: {name} is not a bit spec of this sweep; use one of {sorted(sweep_bits)}")
        entries.append(replace(entry, bits=names))
    return replace(executor, resources=tuple(entries))
