"""``python tests/harness/run/fault_cli.py FAULT MARKER ptqbench-args...``: the CLI with one fault injected, for fault tests.

FAULT is ``block-run`` (each run waits inside ``execute`` until MARKER.go exists) or
``block-write`` (each result write waits after its temp file is written and synced, before the
rename). Either creates MARKER when it starts waiting, so a test knows when to kill or release
the process. The library has no test hooks; the patches live here.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _wait(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    go = marker.with_suffix(".go")
    while not go.exists():
        time.sleep(0.05)


def main() -> None:
    fault, marker, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    import harness.atomic
    import harness.run.executors.base
    import harness.run.execute

    if fault == "block-run":
        real_execute = harness.run.execute.execute

        def execute(run, progress=True):
            _wait(marker)
            return real_execute(run, progress)

        harness.run.executors.base.execute = execute
    elif fault == "block-write":
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if Path(dst).parent.name == "runs":
                _wait(marker)
            return real_replace(src, dst, *a, **kw)

        harness.atomic.os = type(sys)("os_patched")
        harness.atomic.os.__dict__.update(os.__dict__)
        harness.atomic.os.replace = replace
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from harness.cli import main as cli

    sys.argv = ["ptqbench", *args]
    cli()


if __name__ == "__main__":
    main()
