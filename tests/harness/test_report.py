"""The results report: known numbers render as expected cells, bold is the true best, missing is a dash."""
from __future__ import annotations

import math
import re

import pandas as pd
import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.errors import ConfigError
from harness.frame import ZS_AVG, results_frame
from harness.report import FORMATS, report
from tests.harness.records import bold, grid, record, store, zeroshot

GiB = 2**30


def sweep() -> list[dict]:
    """One model: FP, rtn at W8A8 and W4A4, smoothquant at W4A4 (no C4 for rtn W4A4)."""
    return [
        record("m", "rtn", "W4A4", ppl={"wikitext2": 20.0}, zeroshot=zeroshot(0.50), peak_bytes=3 * GiB,
               phases={"load": 1.0, "quantize": 4.0, "evaluate": 31.0}),
        record("m", "fp", "W16A16", ppl={"wikitext2": 10.0, "c4": 12.0}, zeroshot=zeroshot(0.60), peak_bytes=GiB),
        record("m", "smoothquant", "W4A4", ppl={"wikitext2": 15.0, "c4": 30.0}, zeroshot=zeroshot(0.45), peak_bytes=2 * GiB,
               phases={"load": 1.0, "calibrate": 10.0, "quantize": 50.0, "evaluate": 30.0}),
        record("m", "rtn", "W8A8", ppl={"wikitext2": 10.5, "c4": 12.5}, zeroshot=zeroshot(0.58), peak_bytes=None),
    ]


def rows_by(rows: list[dict], method: str, bits: str) -> dict:
    [row] = [r for r in rows if r["method"] == method and r["bits"] == bits]
    return row


def test_results_frame_rows_columns_and_costs():
    frame = results_frame(sweep())
    assert list(zip(frame["method"], frame["bits"])) == [("fp", "W16A16"), ("rtn", "W8A8"), ("rtn", "W4A4"), ("smoothquant", "W4A4")]
    sq = frame.iloc[3]
    assert sq["ppl wikitext2"] == 15.0 and sq[ZS_AVG] == pytest.approx(45.0)
    assert sq["calib s"] == 10.0 and sq["quant s"] == 50.0 and sq["wall s"] == 91.0
    assert sq["device-h"] == pytest.approx(91.0 / 3600) and sq["peak mem GiB"] == pytest.approx(2.0)
    assert sq["device"] == "CPU test (2 threads)"
    assert math.isnan(frame.iloc[2]["ppl c4"]) and math.isnan(frame.iloc[1]["peak mem GiB"])


@pytest.mark.parametrize("fmt", ["md", "csv", "tex", "html"])
def test_every_format_shows_known_cells_best_and_dashes(tmp_path, fmt):
    text = report(store(tmp_path, sweep()), fmt)
    visible = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", text)  # base64 may spell anything
    assert not re.search(r"\bnan\b", visible, re.IGNORECASE)
    rows = grid(text, fmt)
    assert len(rows) == 4
    dash = "--" if fmt == "tex" else "–"
    sq, rtn4, fp, rtn8 = (rows_by(rows, *k) for k in (("smoothquant", "W4A4"), ("rtn", "W4A4"), ("fp", "W16A16"), ("rtn", "W8A8")))
    assert rtn4["ppl c4"] == dash and rtn8["peak mem GiB"] == dash and rtn8["calib s"] == dash
    if fmt == "csv":  # full precision numbers, no markup
        assert float(sq["ppl wikitext2"]) == 15.0 and float(sq["device-h"]) == pytest.approx(91.0 / 3600)
        frame = pd.read_csv(__import__("io").StringIO(text), na_values="–")
        assert frame["ppl c4"].isna().sum() == 1
        return
    # W4A4 competitors: smoothquant has the lower wikitext2 ppl, rtn the higher accuracy and less time
    assert bold(sq["ppl wikitext2"], fmt) == "15.00" and bold(rtn4["ppl wikitext2"], fmt) is None
    assert bold(rtn4[ZS_AVG], fmt) == "50.00" and bold(sq[ZS_AVG], fmt) is None
    assert bold(rtn4["device-h"], fmt) == "0.0100" and bold(sq["peak mem GiB"], fmt) == "2.00"
    assert bold(sq["ppl c4"], fmt) is None  # alone in its group: beats no one
    # FP is the reference, never a competitor, though its perplexity is the lowest; W8A8 has one method
    assert all(bold(c, fmt) is None for c in list(fp.values()) + list(rtn8.values()))
    assert fp["ppl wikitext2"] == "10.00" and rtn8["ppl c4"] == "12.50"


def test_bad_format_and_reference_name_the_field(tmp_path):
    root = store(tmp_path, sweep())
    with pytest.raises(ConfigError, match="--format"):
        report(root, "pdf")
    with pytest.raises(ConfigError, match="--reference.*paper"):
        report(root, "md", reference="arxiv")
    with pytest.raises(ConfigError, match="DIR"):
        report(tmp_path / "nothing", "md")


def test_cli_report_writes_each_format_by_suffix(tmp_path):
    root = store(tmp_path, sweep())
    for suffix in ("md", "csv", "tex", "html"):
        out = tmp_path / f"r.{suffix}"
        result = CliRunner().invoke(main, ["report", str(root), "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "smoothquant" in out.read_text()
    assert set(FORMATS) == {"md", "csv", "tex", "html"}


@pytest.mark.parametrize("fmt", ["md", "csv", "tex", "html"])
def test_a_directory_without_finished_runs_says_so(tmp_path, fmt):
    (tmp_path / "runs").mkdir()
    text = report(tmp_path, fmt)
    assert grid(text, fmt) == []
    assert fmt == "csv" or "No finished runs" in text


def test_empty_runs_and_only_failures_follow_one_rule(tmp_path):
    """An empty runs/, a failed/ alone, or both: the same header and sentence; failures are counted."""
    empty, failed_only = tmp_path / "empty", tmp_path / "failed_only"
    (empty / "runs").mkdir(parents=True)
    (failed_only / "failed").mkdir(parents=True)
    (failed_only / "failed" / "k.json").write_text('{"key": "k", "error": "boom"}')
    a, b = report(empty, "md", title="t"), report(failed_only, "md", title="t")
    assert a.startswith("# t") and "No finished runs in this directory." in a and "failed run" not in a
    a_lines, b_lines = [x.rstrip() for x in a.splitlines()], [x.rstrip() for x in b.splitlines()]  # md breaks lines with "  "
    extra = [line for line in b_lines if line not in a_lines]
    assert extra == ["1 failed run(s) are not shown; their errors are in failed/."]
    assert [line for line in b_lines if line != extra[0]] == a_lines


def test_report_skips_a_corrupt_result(tmp_path, caplog):
    root = store(tmp_path, sweep())
    (root / "runs" / "corrupt.json").write_text("{}")
    with caplog.at_level("WARNING"):
        text = report(root, "md")
    assert "smoothquant" in text
    assert any("corrupt.json" in r.getMessage() for r in caplog.records)


def test_cli_report_refuses_an_unknown_suffix(tmp_path):
    root = store(tmp_path, sweep())
    result = CliRunner().invoke(main, ["report", str(root), "-o", str(tmp_path / "r.docx")])
    assert result.exit_code == 2 and result.output.startswith("Error: -o: suffix '.docx'") and not (tmp_path / "r.docx").exists()
