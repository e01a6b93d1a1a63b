"""The command line: one clear error line for bad input, earlier results untouched."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harness.cli import main

TINY = {
    "name": "tiny", "models": ["tiny-random-llama"], "methods": ["rtn"], "bits": ["W4A4"],
    "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 32, "max_windows": 1}},
}


def write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A results directory holding a finished tiny sweep."""
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "out"
    result = CliRunner().invoke(main, ["run", write(tmp, "ok.yaml", TINY), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.json"))}


@pytest.mark.parametrize("change, needle", [
    ({"bits": ["W4Q4"]}, "bits[0]: 'W4Q4' is not a bit spec"),
    ({"methods": ["smoothquantt"]}, "methods[0].name: method 'smoothquantt': unknown"),
    ({"models": ["/no/such/model"]}, "models[0]: model '/no/such/model'"),
    ({"models": ["smollm2-153m"]}, "did you mean 'smollm2-135m'"),
    ({"calibration": {"samples": -1}}, "calibration.samples"),
    ({"evaluation": {"ppl": {"datasets": ["c5"]}}}, "evaluation.ppl.datasets[0]"),
])
def test_bad_input_is_one_error_line_and_keeps_results(finished, tmp_path, change, needle):
    before = snapshot(finished)
    result = CliRunner().invoke(main, ["run", write(tmp_path, "bad.yaml", {**TINY, **change}), "--out", str(finished)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output
    assert snapshot(finished) == before


def test_rerun_skips_and_report_renders(finished, tmp_path):
    result = CliRunner().invoke(main, ["run", write(tmp_path, "ok.yaml", TINY), "--out", str(finished), "--no-progress"])
    assert result.exit_code == 0 and "0 run, 2 already done" in result.output
    for fmt in ("md", "csv", "html", "tex"):
        out = CliRunner().invoke(main, ["report", str(finished), "--format", fmt])
        assert out.exit_code == 0 and "rtn" in out.output and "W4A4" in out.output
    target = tmp_path / "r" / "report.md"
    assert CliRunner().invoke(main, ["report", str(finished), "-o", str(target)]).exit_code == 0
    assert target.read_text().startswith("# ")


def test_report_of_missing_dir_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and result.output.startswith("Error: ") and "no results" in result.output


def test_dry_run_lists_runs(tmp_path):
    result = CliRunner().invoke(main, ["run", write(tmp_path, "ok.yaml", TINY), "--dry-run"])
    assert result.exit_code == 0 and "tiny-random-llama fp W16A16" in result.output and "rtn W4A4" in result.output


def test_methods_lists_builtins_with_each_options_default_type_and_meaning():
    result = CliRunner().invoke(main, ["methods", "--options"])
    assert result.exit_code == 0 and "rtn" in result.output
    lines = [" ".join(line.split()) for line in result.output.splitlines()]
    assert "clip_ratio = 0.9 (float) fraction of the min/max range kept, in (0, 1]" in lines  # a plugin's option
    assert 'let_attention = \'exact\' ("exact" | "off") LET also on input_layernorm -> q/k/v, v -> o and q/k, GQA-aware; ' \
           "off = only post_attention_layernorm -> gate/up" in lines


def test_methods_write_docs_fills_the_marked_block_and_refuses_a_page_without_it(tmp_path):
    from harness.cli.methods import BEGIN, END

    (tmp_path / "smoothquant.md").write_text(f"# SmoothQuant\n\n{BEGIN}\nstale\n{END}\n\nMore prose.\n")
    (tmp_path / "unrelated.md").write_text("not a method page\n")
    result = CliRunner().invoke(main, ["methods", "--write-docs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "smoothquant.md").read_text()
    assert "stale" not in page and "| `alpha` | `0.5` | float | migration strength in [0, 1]" in page and page.endswith("More prose.\n")
    (tmp_path / "qllm.md").write_text("# QLLM without the block\n")
    bad = CliRunner().invoke(main, ["methods", "--write-docs", str(tmp_path)])
    assert bad.exit_code == 1 and "the page of qllm has no" in bad.output


def test_seeds_option_overrides_the_yaml(tmp_path):
    path = write(tmp_path, "ok.yaml", {**TINY, "methods": ["rtn", "smoothquant"]})
    result = CliRunner().invoke(main, ["run", path, "--dry-run", "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    one = CliRunner().invoke(main, ["run", path, "--dry-run"]).output.splitlines()
    assert len(one) == 3 and len(lines) == 4  # fp, rtn once (the seed cannot change them); smoothquant per seed
    assert [line for line in lines if " seed 1" in f"{line} "] == [line for line in lines if "smoothquant" in line][1:]
    bad = CliRunner().invoke(main, ["run", path, "--dry-run", "--seeds", "0,x"])
    assert bad.exit_code == 2 and bad.output.startswith("Error: --seeds")


def test_prepare_fills_the_token_cache(tmp_path, smollm2_tokenizer):
    from harness.data.token_cache import cache_file, tokenizer_digest

    text = "A corpus of its own for this test, " + str(tmp_path) + ".\n\n" + "Some more words follow here. " * 50
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    entry = cache_file(tokenizer_digest(smollm2_tokenizer), text, False)
    assert not entry.exists()
    result = CliRunner().invoke(main, ["prepare", "--model", "tiny-random-llama", "--dataset", str(corpus)])
    assert result.exit_code == 0, result.output
    n = len(smollm2_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert f"{corpus} tokens for tiny-random-llama: {n} train / {n} test (token cache)" in result.output
    assert entry.exists()
