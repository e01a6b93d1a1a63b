"""The shared driver loop (a cap on attempts in flight, retries first) and run_task's log file."""
from __future__ import annotations

import dataclasses
import logging

from harness.run.executors.base import Executor, Outcome, run_task
from harness.run.execute import plan
from tests.harness.run.executors.conftest import tiny_sweep

MISSING = "ptqbench-no-such-org/no-such-model"  # passes config validation, cannot load offline


class Recorder(Executor):
    """Attempts finish in submission order, one per wait; the first attempt of ``flaky`` fails."""

    kind = "recorder"

    def __init__(self, limit, flaky):
        super().__init__(tiny_sweep(max_retries=1).executor, ".", progress=False)
        self.limit, self.flaky = limit, flaky
        self.in_flight, self.peak, self.events = [], 0, []

    def max_in_flight(self):
        return self.limit

    def submit(self, run):
        handle = (run.key, len(self.events))
        self.in_flight.append(handle)
        self.peak = max(self.peak, len(self.in_flight))
        self.events.append(("submit", run.key))
        return handle

    def wait(self, handles):
        handle = self.in_flight.pop(0)
        assert handle in handles
        failed = handle[0] == self.flaky and ("failed", handle[0]) not in self.events
        self.events.append(("failed" if failed else "done", handle[0]))
        return [(handle, Outcome(error="RuntimeError: preempted") if failed else Outcome(record={"key": handle[0]}))]


def test_a_cap_keeps_that_many_attempts_in_flight_and_a_retry_goes_first():
    runs = plan(tiny_sweep(bits=["W8A8", "W4A4", "W6A6"]))  # the baseline and three rtn runs
    a, b, c, d = (r.key for r in runs)
    done = []
    ex = Recorder(limit=2, flaky=a)
    ex.run(runs, lambda r, rec: done.append(r.key), lambda r, o: done.append(("failed", r.key)))
    assert ex.peak == 2
    assert ex.events == [("submit", a), ("submit", b), ("failed", a), ("submit", a), ("done", b), ("submit", c),
                         ("done", a), ("submit", d), ("done", c), ("done", d)]
    assert done == [b, a, c, d]


def test_without_a_cap_every_run_is_submitted_at_once():
    runs = plan(tiny_sweep(bits=["W8A8", "W4A4"]))
    ex = Recorder(limit=None, flaky=None)
    ex.run(runs, lambda r, rec: None, lambda r, o: None)
    assert ex.peak == len(runs) == 3 and [e for e, _ in ex.events[:3]] == ["submit"] * 3


def test_run_task_appends_start_progress_and_result_to_the_runs_log_file(tmp_path):
    ok = dataclasses.replace(plan(tiny_sweep())[0], log_file=str(tmp_path / "logs" / "ok.log"))  # the FP baseline
    bad = dataclasses.replace(plan(tiny_sweep(models=[MISSING]))[0], log_file=str(tmp_path / "logs" / "bad.log"))
    assert run_task(ok).record is not None
    text = (tmp_path / "logs" / "ok.log").read_text()
    assert f"run {ok.label} (key {ok.key}) started on " in text
    # the block-by-block perplexity logs its progress when no bar is shown (run_task's default)
    assert "harness.progress: ppl brown (tiny-random-llama fp W16A16): 2/2 block (100%)" in text
    assert f"run {ok.label} finished in " in text and '"brown": ' in text
    outcome = run_task(bad)
    assert outcome.record is None
    text = (tmp_path / "logs" / "bad.log").read_text()
    assert f"ERROR ptqbench.run: run {bad.label} failed after " in text and outcome.error in text
    assert "Traceback (most recent call last)" in text


def test_a_request_below_the_estimated_peak_is_warned_about_before_submitting(caplog):
    runs = plan(tiny_sweep(bits=["W8A8"]))
    ex = Recorder(limit=None, flaky=None)
    # every estimate counts the Python/torch runtime, 0.7 GB (harness.engine.memory.RUNTIME_BYTES), so 0.5 GB is too little
    ex.requested = lambda run: {"mem_gb": 0.5 if run.method == "rtn" else 64}
    with caplog.at_level(logging.WARNING):
        ex.run(runs, lambda r, rec: None, lambda r, o: None)
    warned = [m for m in caplog.messages if "estimated peak" in m]
    assert len(warned) == 1 and runs[1].label in warned[0] and "asks for 0.5 GB" in warned[0]
