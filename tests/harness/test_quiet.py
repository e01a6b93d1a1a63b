"""`ptqbench -q` and `--version`."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from harness import __version__
from harness.cli import main


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ptqbench {__version__}"


def test_quiet_disables_bars_even_when_a_library_asks_for_them():
    # in a fresh interpreter: silencing patches tqdm for the whole process
    code = ("from tqdm import tqdm; from tqdm.auto import tqdm as auto; before = tqdm(range(2), disable=False).disable\n"
            "from harness.quiet import silence_progress; silence_progress()\n"
            "import os; print(before, tqdm(range(2), disable=False).disable, auto(range(2)).disable, os.environ['PTQBENCH_QUIET'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True", "1"]


@pytest.mark.slow
def test_quiet_run_prints_no_progress(tmp_path):
    import yaml

    from tests.harness.run.executors.conftest import tiny_raw

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(bits=["W8A8"])))
    out = subprocess.run([sys.executable, "-m", "harness.cli", "-q", "run", str(path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "it/s" not in out.stderr and "%|" not in out.stderr and "INFO" not in out.stderr
    assert "2 run, 0 already done, 0 failed" in out.stdout
