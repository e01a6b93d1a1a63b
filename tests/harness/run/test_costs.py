"""Cost records: phases, device-hours with the device's name, peak memory that sees an allocation."""
from __future__ import annotations

import time

import pytest
import torch

from harness.run.costs import CostMeter, current_rss, device_name


def test_cost_summary_on_cpu():
    with CostMeter(torch.device("cpu")) as meter:
        with meter.phase("calibrate"):
            time.sleep(0.05)
        with meter.phase("quantize"):
            block = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, touched so it is resident
            time.sleep(0.05)
        with meter.phase("quantize"):  # a phase entered twice adds up
            time.sleep(0.02)
        with meter.phase("load"):
            time.sleep(0.02)
        with meter.phase("evaluate"):
            time.sleep(0.05)
    del block
    s = meter.summary()
    assert s["device"] == device_name(torch.device("cpu")) and s["device"].startswith("CPU ") and s["device_type"] == "cpu"
    assert s["phases_s"]["calibrate"] >= 0.05 and s["phases_s"]["quantize"] >= 0.07
    assert s["phases_s"]["load"] >= 0.02 and s["phases_s"]["evaluate"] >= 0.05
    assert s["device_hours"] == pytest.approx(s["wall_s"] / 3600, rel=1e-9)
    # only calibration and quantization count as the papers' "training cost": not load, not evaluate
    train_s = s["phases_s"]["calibrate"] + s["phases_s"]["quantize"]
    assert s["quantize_device_hours"] == pytest.approx(train_s / 3600, rel=1e-9)
    assert s["device_hours"] - s["quantize_device_hours"] >= (s["phases_s"]["load"] + s["phases_s"]["evaluate"]) / 3600 * (1 - 1e-9)
    assert s["wall_s"] >= sum(s["phases_s"].values()) - 1e-9
    # the 256 MiB block was resident at some sample: the peak is above what the process held at the
    # meter's start (taken after it hands freed heap back to the OS, so it is no higher than now)
    assert 0 < s["rss_at_start_bytes"] <= current_rss() + 64 * 2**20
    assert s["peak_memory_kind"] == "cpu_peak_rss" and s["peak_memory_bytes"] >= s["rss_at_start_bytes"] + 200 * 2**20
