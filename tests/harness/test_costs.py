from __future__ import annotations

import time

import torch

from harness.costs import CostMeter, current_rss


def test_peak_rss_sees_a_temporary_allocation():
    with CostMeter(torch.device("cpu")) as meter:
        base = current_rss()
        with meter.phase("alloc"):
            block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            time.sleep(0.1)
            del block
        with meter.phase("alloc"):
            time.sleep(0.01)
    summary = meter.summary()
    assert summary["peak_memory_bytes"] >= base + 48 * 2**20
    assert summary["phases_s"]["alloc"] >= 0.1
    assert summary["wall_s"] >= summary["phases_s"]["alloc"]
    assert abs(summary["device_hours"] - summary["wall_s"] / 3600) < 1e-6
    assert summary["device"] == "cpu" and summary["peak_memory_kind"] == "cpu_peak_rss"
