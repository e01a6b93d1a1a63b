"""A plain (non-editable) `pip install .` ships everything the commands read, package data included.

The package is installed with ``pip install --no-deps --target`` into a temporary folder (its
dependencies come from the test environment), and the commands run from another directory with
that folder first on the path, so nothing can be read from this checkout.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.records import PAPER_TASKS, record, store, zeroshot

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")  # keep build/ and *.egg-info out of the checkout
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
                    "--target", str(target), str(ROOT)], check=True, cwd=build, capture_output=True, text=True)
    return target


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_copy_is_the_one_imported_and_has_its_reference_data(installed, tmp_path):
    out = run_installed(installed, tmp_path, "-c",
                        "import harness, harness.report.paper as p; print(harness.__file__); print(p.REFERENCE_FILE.is_file())")
    assert out.returncode == 0, out.stderr
    where, has_data = out.stdout.split()
    assert Path(where).is_relative_to(installed) and has_data == "True"


def test_report_reference_paper_works_from_a_plain_install(installed, tmp_path):
    results = store(tmp_path, [record("llama-2-7b", "fp", "W16A16", ppl={"wikitext2": 5.5}, zeroshot=zeroshot(0.6)),
                               record("llama-2-7b", "qllm", "W4A4", ppl={"wikitext2": 12.0}, zeroshot=zeroshot(0.5, PAPER_TASKS))])
    out = run_installed(installed, tmp_path, "-m", "harness.cli", "report", str(results), "--reference", "paper")
    assert out.returncode == 0, out.stderr
    assert "Ours vs published" in out.stdout and "11.75" in out.stdout  # the paper's LLaMA-2-7B W4A4 QLLM WikiText-2


def test_ptqbench_api_imports_from_a_plain_install(installed, tmp_path):
    out = run_installed(installed, tmp_path, "-c", "import ptqbench; print(ptqbench.__file__); print(ptqbench.__version__)")
    assert out.returncode == 0, out.stderr
    where, version = out.stdout.split()
    assert Path(where).is_relative_to(installed) and version == "0.1.0"


def test_pyproject_lists_every_package_folder():
    import tomllib
    from setuptools import find_packages

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == {*find_packages(str(ROOT), include=["harness*", "methods*"]), "ptqbench"}
