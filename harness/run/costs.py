"""What a run costs: wall time per phase, device-hours and peak memory.

Device-hours are wall time x devices, recorded with the device's name (GPU name, or CPU model)
so that hours from different hardware are never compared unknowingly. ``quantize_device_hours``
counts only calibration and quantization, the "training cost" the papers report.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA. On CPU it is the peak resident set
size of this process during the run, sampled by a background thread every 10 ms (``ru_maxrss``
cannot be reset between the runs of one sweep, so it would report the largest run so far).
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from harness.runtime import release_freed_memory

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def device_name(device: torch.device) -> str:
    """What device-hours were measured on: the GPU's name, or the CPU model with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: lifetime peak is the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Samples RSS in a daemon thread between ``start()`` and ``stop()``; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            self._stop.wait(self.interval)

    def start(self) -> PeakRSS:
        self.peak = current_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="ptqbench-rss")
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss())
        return self.peak


@dataclass
class CostMeter:
    """Times named phases and tracks peak memory of one run on one device."""

    device: torch.device
    phases: dict[str, float] = field(default_factory=dict)
    _rss: PeakRSS | None = None
    _t0: float = 0.0

    def __enter__(self) -> CostMeter:
        # Runs of one sweep share a process: hand memory freed by earlier runs back to the OS first,
        # so this run's peak RSS is not inflated by a previous run's heap.
        release_freed_memory()
        self.rss_at_start = current_rss()
        self._t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._rss = PeakRSS().start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.peak_rss = self._rss.stop() if self._rss else 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t

    def summary(self) -> dict:
        cuda = self.device.type == "cuda"
        devices = 1  # one run uses one device; distributed executors record per run
        return {
            "wall_s": self.wall_s,  # unrounded: device-hours are derived from it
            "phases_s": dict(self.phases),
            "device": device_name(self.device),
            "device_type": self.device.type,
            "device_count": devices,
            "device_hours": self.wall_s * devices / 3600.0,
            # calibration + quantization only: what the papers' "training cost" tables measure
            "quantize_device_hours": (self.phases.get("calibrate", 0.0) + self.phases.get("quantize", 0.0)) * devices / 3600.0,
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(self.device)) if cuda else int(self.peak_rss),
            "peak_memory_kind": "cuda_max_allocated" if cuda else "cpu_peak_rss",
            "peak_rss_bytes": int(self.peak_rss),
            "rss_at_start_bytes": int(self.rss_at_start),
        }
