"""Progress: a bar when enabled; otherwise rate-limited log lines, always one at the end."""
from __future__ import annotations

import logging

from harness.progress import Progress, duration


def test_durations_read_as_hours_minutes_seconds():
    assert [duration(s) for s in (0, 12.9, 185, 3725, 9 * 3600)] == ["0s", "12s", "3m05s", "1h02m", "9h00m"]


def test_without_a_bar_each_step_can_be_a_log_line_with_count_and_postfix(caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="harness.progress"):
        bar = Progress(range(4), desc="omniquant", enabled=False, unit="group", every_s=0)
        for i in bar:
            seen.append(i)
            bar.set_postfix(loss=f"{1 / (i + 1):.3g}")
    assert seen == [0, 1, 2, 3]  # the items themselves pass through unchanged
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0].startswith("omniquant: 1/4 group (25%), 0s elapsed, about 0s left; loss=1")
    assert lines[-1].startswith("omniquant: 4/4 group (100%)") and "done; loss=0.25" in lines[-1]


def test_the_rate_limit_keeps_the_last_line_only_for_a_fast_loop(caplog):
    with caplog.at_level(logging.INFO, logger="harness.progress"):
        assert sum(Progress(range(1000), desc="ppl", enabled=False, unit="batch")) == sum(range(1000))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["ppl: 1000/1000 batch (100%)"]


def test_with_a_bar_there_are_no_log_lines(caplog):
    with caplog.at_level(logging.INFO, logger="harness.progress"):
        assert list(Progress(range(3), desc="x", enabled=True, every_s=0)) == [0, 1, 2]
    assert not caplog.records


def test_a_resumed_loop_counts_the_steps_done_before_it(caplog):
    with caplog.at_level(logging.INFO, logger="harness.progress"):
        list(Progress(range(2, 4), desc="qllm", enabled=False, unit="group", initial=2, every_s=0))
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["qllm: 3/4 group", "qllm: 4/4 group"]
