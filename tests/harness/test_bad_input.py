"""The bad-input catalogue: every case a user met, fed to the CLI, must end in exit 2 and one ``Error:`` line naming it.

Each case writes its config (and any file it points at) under ``tmp_path``, runs ``ptqbench run``
(or ``report``) through Click's runner, and checks the single line. Cases that need a model folder
share one tiny LLaMA saved with ``save_pretrained``.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from harness.cli import main
from harness.data.windows import calibration_windows
from harness.errors import ResourceUnavailableError
from harness.models import load_model

TEXT = "The quick brown fox jumps over the lazy dog while the committee debates the budget. " * 60
BASE = {"name": "bad", "models": ["tiny-random-llama"], "methods": ["rtn"], "bits": ["W8A8"],
        "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 32, "max_windows": 1}}}


def run_cli(args: list[str]) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def one_error_line(code: int, lines: list[str], *needles: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny LLaMA folder (weights, config, smollm2's tokenizer) as a user would have one."""
    from transformers import AutoTokenizer

    from harness.models import ZOO, gguf_folder, tiny_llama

    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_llama(seed=0).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_folder("smollm2-135m", ZOO["smollm2-135m"])).save_pretrained(folder)
    return folder


def _gpt2(tmp: Path) -> dict:
    folder = tmp / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2", "n_embd": 64, "n_layer": 2}')
    return {"models": [str(folder)]}


def _weights(tmp: Path, content: bytes) -> dict:
    folder = tmp / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, '
                                        '"num_attention_heads": 4, "max_position_embeddings": 2048}')
    (folder / "model.safetensors").write_bytes(content)
    return {"models": [str(folder)]}


def _dataset(tmp: Path, content: bytes | None) -> dict:
    path = tmp / "data.txt"
    path.mkdir() if content is None else path.write_bytes(content)
    return {"evaluation": {"ppl": {"datasets": [str(path)], "seqlen": 32, "max_windows": 1}}}


# (id, make(tmp) -> config changes, needles the one line must contain)
CASES = [
    ("group-size-global", lambda t: {"bits": ["W4A4g7"]}, ["bits[0]: group size 7 (W4A4g7) does not divide", "hidden_size 64"]),
    ("group-size-per-method", lambda t: {"methods": [{"name": "rtn", "bits": ["W4A16g48"]}]}, ["methods[0].bits[0]: group size 48"]),
    ("gpt2-family", _gpt2, ["models[0]: model", "'gpt2' model", "supports llama, mistral"]),
    ("ppl-seqlen-above-positions", lambda t: {"evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 4096}}},
     ["evaluation.ppl.seqlen: 4096 is longer than model 'tiny-random-llama' allows (max_position_embeddings 2048)"]),
    ("calibration-seqlen-above-positions", lambda t: {"methods": ["smoothquant"], "calibration": {"seqlen": 4096}},
     ["calibration.seqlen: 4096 is longer"]),
    ("binary-dataset", lambda t: _dataset(t, bytes(range(256)) * 4), ["evaluation.ppl.datasets[0]", "not a text file (NUL byte at offset 0)"]),
    ("latin1-dataset", lambda t: _dataset(t, "caf\xe9 na\xefve ".encode("latin-1") * 10), ["evaluation.ppl.datasets[0]", "not a UTF-8 text file"]),
    ("directory-dataset", lambda t: _dataset(t, None), ["evaluation.ppl.datasets[0]", "is a directory, not a text file"]),
    ("directory-calibration", lambda t: {"methods": ["smoothquant"], "calibration": {"dataset": str(t)}}, ["calibration.dataset", "is a directory"]),
    ("evaluation-measures-nothing", lambda t: {"evaluation": {"ppl": {"datasets": []}}}, ["Error: evaluation: measures nothing"]),
    ("empty-safetensors", lambda t: _weights(t, b""), ["model.safetensors", "empty or truncated safetensors file (0 bytes)"]),
    ("corrupt-safetensors", lambda t: _weights(t, b"\xff" * 100), ["model.safetensors", "corrupt safetensors file"]),
    ("name-escapes-runs", lambda t: {"name": "../../x"}, ["name: '../../x' is not allowed", "path separators"]),
    ("name-with-slash", lambda t: {"name": "a/b"}, ["name: 'a/b' is not allowed"]),
    ("name-hidden", lambda t: {"name": ".x"}, ["name: '.x' is not allowed"]),
    ("attention-kernel", lambda t: {"attention_kernel": "flash"}, ["attention_kernel: 'flash' is not allowed", "'sdpa', 'eager'"]),
]


@pytest.mark.parametrize("make, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_naming_it(tmp_path, make, needles):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**BASE, **make(tmp_path)}))
    out = tmp_path / "out"
    code, lines = run_cli(["run", str(config), "--out", str(out), "--no-progress"])
    one_error_line(code, lines, *needles)
    assert not (out / "runs").exists()  # refused before any work


@pytest.mark.parametrize("text, needles", [
    ("name: t\nmodels:\n\t- tiny-random-llama\n", ["line 3, column 1", "tabs are not allowed in YAML"]),
    ("name: t\nmodels: [tiny-random-llama\nbits: [W8A8]\n", ["line 3, column 5"]),
    ("name: t\n  models: x\n", ["line 2, column 9", "mapping values are not allowed"]),
], ids=["tab", "unclosed-bracket", "bad-indent"])
def test_malformed_yaml_says_line_and_column(tmp_path, text, needles):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    one_error_line(*run_cli(["run", str(config), "--dry-run"]), "is not valid YAML", *needles)


def test_cuda_without_cuda_is_refused_at_validation(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "cuda.yaml"
    config.write_text(yaml.safe_dump({**BASE, "device": "cuda"}))
    one_error_line(*run_cli(["run", str(config), "--dry-run"]), "device: 'cuda' is not available on this machine")
    config.write_text(yaml.safe_dump(BASE))
    one_error_line(*run_cli(["run", str(config), "--dry-run", "--device", "cuda"]), "device: 'cuda'")
    # A ray/slurm sweep runs on GPU workers, not here: the driver's lack of CUDA says nothing.
    code, _ = run_cli(["run", str(config), "--dry-run", "--device", "cuda", "--executor", "slurm"])
    assert code == 0


def test_report_refuses_an_unknown_suffix(tmp_path):
    (tmp_path / "runs").mkdir()
    one_error_line(*run_cli(["report", str(tmp_path), "-o", str(tmp_path / "rep.docx")]), "-o: suffix '.docx'", ".md", ".html")
    assert not (tmp_path / "rep.docx").exists()
    code, _ = run_cli(["report", str(tmp_path), "-o", str(tmp_path / "rep.docx"), "--format", "md"])
    assert code == 0  # an explicit --format is the user's choice


def _read_only(path: Path, monkeypatch) -> None:
    """Make ``path`` unwritable: chmod where that binds, else (root ignores modes) refuse creating files under it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    real_open = os.open

    def open_(file, flags, *args, **kwargs):
        if flags & os.O_CREAT and str(file).startswith(str(path)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def test_read_only_out_is_one_line(tmp_path, monkeypatch):
    config = tmp_path / "ok.yaml"
    config.write_text(yaml.safe_dump(BASE))
    out = tmp_path / "ro"
    _read_only(out, monkeypatch)
    one_error_line(*run_cli(["run", str(config), "--out", str(out), "--no-progress"]), str(out), "could not write")
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_corrupt_weights_at_load_name_the_file(model_folder, tmp_path):
    """Past the header check (a file changed after planning), loading still names the file."""
    import shutil

    broken = tmp_path / "m"
    shutil.copytree(model_folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ResourceUnavailableError, match=r"model\.safetensors.* is not a valid safetensors file"):
        load_model(str(broken), dtype="float32", device="cpu")


class _WordTokenizer:
    """One token per word: enough for the calibration sampler, no model files."""

    name_or_path = "words"

    def __len__(self) -> int:
        return 1000

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [hash(w) % 1000 for w in text.split()]}


def test_overlapping_calibration_windows_warn_naming_the_field(tmp_path, caplog):
    path = tmp_path / "small.txt"
    path.write_text(TEXT)  # 900 words = 900 tokens here
    with caplog.at_level(logging.WARNING, logger="harness.data.windows"):
        calibration_windows(str(path), _WordTokenizer(), samples=4, seqlen=100, seed=0)
    assert not caplog.records  # 400 of 900 tokens: no warning
    with caplog.at_level(logging.WARNING, logger="harness.data.windows"):
        windows = calibration_windows(str(path), _WordTokenizer(), samples=20, seqlen=100, seed=0)
    assert windows.shape == (20, 100)
    [warning] = caplog.records
    assert "calibration.samples" in warning.getMessage() and "2000 tokens" in warning.getMessage() and "900" in warning.getMessage()


def test_widths_come_from_the_config_including_an_explicit_head_dim():
    from harness.run.preflight import model_widths

    assert model_widths({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}) == \
        {"hidden_size": 64, "intermediate_size": 128, "attention output": 64}
    # head_dim given (and not hidden / heads): o_proj's input is heads x head_dim
    assert model_widths({"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "head_dim": 32})["attention output"] == 128
    # a MoE's down_proj is an expert's: its width is moe_intermediate_size, not the dense MLP's intermediate_size
    moe = {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 48,
           "num_attention_heads": 4, "num_experts": 4}
    assert model_widths(moe)["intermediate_size"] == 48


def test_a_group_size_dividing_every_width_is_accepted(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text(yaml.safe_dump({**BASE, "bits": ["W4A16g32", "W4A4g64"]}))
    code, lines = run_cli(["run", str(config), "--dry-run"])
    assert code == 0 and any("rtn W4A16g32" in line for line in lines), lines
