"""The results report: known numbers render as expected cells, bold is the true best, missing is a dash."""
from __future__ import annotations

import csv
import io
import math
import re

import pandas as pd
import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.errors import ConfigError
from harness.report.frame import ZS_AVG, load_frame, tidy_frame
from harness.report.render import FORMATS, report
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


def assert_is_format(text: str, fmt: str) -> None:
    """The text is the named format and no other: each format's own marker, checked independently."""
    first = text.splitlines()[0]
    if fmt == "md":
        assert text.startswith("# ") and "| model |" in text and "\\begin{" not in text and "<table" not in text
    elif fmt == "csv":
        header = next(csv.reader(io.StringIO(text)))
        assert {"model", "method", "bits"} <= set(header) and "|" not in text and "<" not in first
        assert not text.startswith("#") and "\\begin{" not in text
    elif fmt == "tex":
        assert text.startswith("\\begin{table}") and all(r in text for r in ("\\toprule", "\\midrule", "\\bottomrule"))
        assert "| model |" not in text and "<table" not in text
    else:
        assert text.lower().startswith("<!doctype html>") and "<table" in text and "</html>" in text
        assert "| model |" not in text and "\\begin{table}" not in text


def rows_by(rows: list[dict], method: str, bits: str) -> dict:
    [row] = [r for r in rows if r["method"] == method and r["bits"] == bits]
    return row


def test_tidy_frame_rows_columns_and_costs():
    frame = tidy_frame(sweep())
    assert list(zip(frame["method"], frame["bits"])) == [("fp", "W16A16"), ("rtn", "W8A8"), ("rtn", "W4A4"), ("smoothquant", "W4A4")]
    sq = frame.iloc[3]
    assert sq["ppl_wikitext2"] == 15.0 and sq[ZS_AVG] == pytest.approx(45.0)
    assert sq["calibrate_s"] == 10.0 and sq["quantize_s"] == 50.0 and sq["wall_s"] == 91.0
    assert sq["device_hours"] == pytest.approx(91.0 / 3600) and sq["peak_memory_gib"] == pytest.approx(2.0)
    assert sq["device"] == "CPU test (2 threads)" and sq["run_key"] == sweep()[2].key and sq["seed"] == 0
    assert math.isnan(frame.iloc[2]["ppl_c4"]) and math.isnan(frame.iloc[1]["peak_memory_gib"])


RESULTS = 3  # the long table comes after the pivot tables of ppl_wikitext2, ppl_c4 and zeroshot_avg_pct


@pytest.mark.parametrize("fmt", ["md", "tex", "html"])
def test_every_format_shows_known_cells_best_and_dashes(tmp_path, fmt):
    text = report(store(tmp_path, sweep()), fmt)
    assert_is_format(text, fmt)
    visible = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", text)  # base64 may spell anything
    assert not re.search(r"\bnan\b", visible, re.IGNORECASE) and "±" not in visible  # one seed: plain numbers
    rows = grid(text, fmt, table=RESULTS)
    assert len(rows) == 4 and all(r["variant"] == "" for r in rows) and "n" not in rows[0]
    dash = "--" if fmt == "tex" else "–"
    sq, rtn4, fp, rtn8 = (rows_by(rows, *k) for k in (("smoothquant", "W4A4"), ("rtn", "W4A4"), ("fp", "W16A16"), ("rtn", "W8A8")))
    assert rtn4["ppl_c4"] == dash and rtn8["peak_memory_gib"] == dash and rtn8["calibrate_s"] == dash
    # W4A4 competitors: smoothquant has the lower wikitext2 ppl, rtn the higher accuracy and less time
    assert bold(sq["ppl_wikitext2"], fmt) == "15.00" and bold(rtn4["ppl_wikitext2"], fmt) is None
    assert bold(rtn4[ZS_AVG], fmt) == "50.00" and bold(sq[ZS_AVG], fmt) is None
    assert bold(rtn4["device_hours"], fmt) == "0.0100" and bold(sq["peak_memory_gib"], fmt) == "2.00"
    assert bold(sq["ppl_c4"], fmt) is None  # alone in its group: beats no one
    # FP is the reference, never a competitor, though its perplexity is the lowest; W8A8 has one method
    assert all(bold(c, fmt) is None for c in list(fp.values()) + list(rtn8.values()))
    assert fp["ppl_wikitext2"] == "10.00" and rtn8["ppl_c4"] == "12.50"


def test_csv_is_the_tidy_per_run_frame_with_empty_missing_cells(tmp_path):
    text = report(store(tmp_path, sweep()), "csv")
    back = pd.read_csv(io.StringIO(text))
    assert len(back) == 4 and list(back.columns[:7]) == ["run_key", "model", "method", "variant", "bits", "seed", "baseline"]
    for unit in ("ppl_wikitext2", "zeroshot_avg_pct", "wall_s", "load_s", "calibrate_s", "quantize_s", "evaluate_s",
                 "device_hours", "peak_memory_gib"):
        assert unit in back.columns
    sq = back[back["method"] == "smoothquant"].iloc[0]
    assert sq["ppl_wikitext2"] == 15.0 and sq["device_hours"] == pytest.approx(91.0 / 3600)  # full precision
    assert back["ppl_c4"].isna().sum() == 1 and "–" not in text and "nan" not in text.lower()
    assert set(back["run_key"]) == {r.key for r in sweep()}


def test_parquet_round_trips_the_tidy_frame(tmp_path):
    root = store(tmp_path, sweep())
    out = tmp_path / "r.parquet"
    result = CliRunner().invoke(main, ["report", str(root), "-o", str(out)])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_parquet(out), load_frame(root), check_dtype=False)
    bad = CliRunner().invoke(main, ["report", str(root), "--format", "parquet"])  # binary: needs -o
    assert bad.exit_code == 2 and "-o" in bad.output


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
    for suffix in ("md", "csv", "tex", "html", "parquet"):
        out = tmp_path / f"r.{suffix}"
        result = CliRunner().invoke(main, ["report", str(root), "-o", str(out)])
        assert result.exit_code == 0, result.output
        if suffix == "parquet":
            assert out.read_bytes()[:4] == b"PAR1"  # Parquet's magic number
            continue
        text = out.read_text()
        assert_is_format(text, suffix)
        assert "smoothquant" in text
    assert set(FORMATS) == {"md", "csv", "tex", "html", "parquet"}


@pytest.mark.parametrize("fmt", ["md", "csv", "tex", "html"])
def test_a_directory_without_finished_runs_says_so(tmp_path, fmt):
    (tmp_path / "runs").mkdir()
    text = report(tmp_path, fmt)
    assert grid(text, fmt) == []  # no pivot tables either: the first table is the empty results table
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


def seeded() -> list:
    """Three seeds of fp, rtn, smoothquant, qllm and a qllm variant at W4A4 on one model (perplexity on brown)."""
    ppl = {"fp": (40.0, 40.0, 40.0), "rtn": (200.0, 200.0, 200.0), "smoothquant": (100.0, 110.0, 90.0),
           "qllm": (50.0, 52.0, 48.0)}
    out = []
    for seed in range(3):
        for method, values in ppl.items():
            out.append(record("m", method, "W16A16" if method == "fp" else "W4A4", ppl={"brown": values[seed]}, seed=seed))
        out.append(record("m", "qllm", "W4A4", ppl={"brown": (60.0, 40.0, 50.0)[seed]}, seed=seed,
                          options={"theta": "ratio", "assembly": False}))
    return out


@pytest.mark.parametrize("fmt", ["md", "tex", "html"])
def test_seeds_show_mean_std_and_n_and_bold_only_beyond_the_spread(tmp_path, fmt):
    text = report(store(tmp_path, seeded()), fmt)
    pm = (lambda m, s: f"${m} \\pm {s}$") if fmt == "tex" else (lambda m, s: f"{m} ± {s}")  # noqa: E731
    pivot = grid(text, fmt, table=0)  # ppl_brown: rows method + variant, columns bit specs
    assert [(r["method"], r["variant"]) for r in pivot] == [
        ("fp", ""), ("qllm", ""), ("qllm", "assembly=false, theta=ratio"), ("rtn", ""), ("smoothquant", "")]
    cells = {(r["method"], r["variant"]): r for r in pivot}
    assert cells["fp", ""]["W16A16"] == pm("40.00", "0.00") and cells["fp", ""]["W4A4"] == ("--" if fmt == "tex" else "–")
    assert cells["smoothquant", ""]["W4A4"] == pm("100.00", "10.00")  # std of 100, 110, 90 (ddof 1) = 10
    # qllm 50 ± 2 ties its variant 50 ± 10: no lead at all, so nothing is bold at W4A4
    assert all(bold(r["W4A4"], fmt) is None for r in pivot)
    rows = grid(text, fmt, table=1)
    assert {r["n"] for r in rows} == {"3"}
    assert "mean ± std over seeds" in text and "larger of the two stds" in text
    assert "stands for every seed" not in text  # these records do not say they are seed-independent


def test_a_seed_independent_run_is_one_run_that_the_report_says_stands_for_every_seed(tmp_path):
    records = [r for r in seeded() if r.method not in ("fp", "rtn") or r.seed == 0]
    for r in records:
        if r.method in ("fp", "rtn"):
            r.provenance = {**r.provenance, "seed_independent": True}  # as execute records it for FP and RTN
    text = report(store(tmp_path, records), "md")
    rows = {(r["method"], r["variant"]): r for r in grid(text, "md", table=1)}
    assert rows["fp", ""]["n"] == "1" and rows["rtn", ""]["n"] == "1" and rows["smoothquant", ""]["n"] == "3"
    assert "fp, rtn: the seed cannot change them (no calibration data, no randomness), so one run, at the first seed, " \
           "stands for every seed (n = 1)." in text


def test_bold_with_seeds_needs_a_lead_beyond_both_stds(tmp_path):
    records = [r for r in seeded() if r.options == {}]  # without the variant, qllm 50 ± 2 leads sq 100 ± 10 and rtn 200 ± 0
    rows = grid(report(store(tmp_path, records), "md"), "md", table=0)
    assert [bold(r["W4A4"], "md") for r in rows] == [None, "50.00 ± 2.00", None, None]
