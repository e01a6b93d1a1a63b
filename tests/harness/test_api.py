"""``import ptqbench``: the README's example runs as written, and the API checks its arguments."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section has one example"
    return blocks[0]


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    frame = scope["frame"]
    assert list(frame["method"]) == ["fp", "rtn"] and frame["ppl_brown"].notna().all()
    assert scope["exported"].format == "compressed-tensors/pack-quantized"  # the example asks for symmetric weights
    assert (tmp_path / "exports" / "tiny-w4a16" / "config.json").is_file()


def test_quantize_checks_its_arguments(tiny_model):
    import ptqbench

    with pytest.raises(ptqbench.ConfigError, match="tokenizer="):
        ptqbench.quantize(tiny_model, "smoothquant", "W8A8", "brown")
    with pytest.raises(ptqbench.PtqbenchError, match="alhpa"):
        ptqbench.quantize(tiny_model, "smoothquant", "W8A8", alhpa=0.5)
    assert ptqbench.__version__ and ptqbench.Method.__module__ == "harness.method"
