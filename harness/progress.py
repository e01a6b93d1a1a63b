"""Progress of a long loop: a tqdm bar where someone watches a terminal, log lines where nobody does.

Ray tasks and Slurm jobs run without bars (many workers' bars would interleave, and a job's
stderr is a file). There the loop logs one INFO line at most every ``LOG_EVERY_S`` seconds and
one at its end, with the count, the elapsed time and the time left; the run's log file
(``harness.run.runlog``) keeps them, so a nine-hour job can be followed with ``tail -f``.

    for start in (bar := Progress(range(0, n, step), desc="omniquant", enabled=progress, unit="group")):
        ...
        bar.set_postfix(loss=f"{loss:.3g}")
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# One line a minute: a 70B block group takes minutes, a 7B evaluation batch a fraction of a second;
# either way the log grows by at most ~60 lines an hour per loop.
LOG_EVERY_S = 60.0


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``12s``: short enough for a log line."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Iterate ``iterable`` under a tqdm bar (``enabled``) or with rate-limited log lines (not ``enabled``)."""

    def __init__(self, iterable: Iterable[Any], *, desc: str, enabled: bool, unit: str = "it", leave: bool = True,
                 initial: int = 0, every_s: float = LOG_EVERY_S) -> None:
        """``initial``: steps done before ``iterable`` starts (a resumed run), counted in the totals, not in the rate."""
        self.total = initial + len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        self.bar = tqdm(iterable, desc=desc, disable=not enabled, unit=unit, leave=leave, initial=initial, total=self.total)
        self.desc, self.unit, self.enabled, self.every_s, self.initial = desc, unit, enabled, every_s, initial
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, **values: Any) -> None:
        """Shown on the bar, and appended to the next log line."""
        self.postfix.update(values)
        self.bar.set_postfix(**values)

    def __iter__(self) -> Iterator[Any]:
        if self.enabled:
            yield from self.bar
            return
        start = last = time.monotonic()
        done = self.initial
        for item in self.bar:
            yield item  # the caller's loop body runs here; what follows counts it as done
            done += 1
            now = time.monotonic()
            if now - last >= self.every_s or done == self.total:
                last = now
                log.info("%s", self.line(done, now - start))

    def line(self, done: int, elapsed: float) -> str:
        if self.total:
            left = elapsed / (done - self.initial) * (self.total - done)
            head = f"{self.desc}: {done}/{self.total} {self.unit} ({100 * done // self.total}%), {duration(elapsed)} elapsed"
            head += f", about {duration(left)} left" if done < self.total else ", done"
        else:
            head = f"{self.desc}: {done} {self.unit}, {duration(elapsed)} elapsed"
        extra = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        return f"{head}{'; ' + extra if extra else ''}"
