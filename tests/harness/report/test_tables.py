"""Table rendering: bold is the true best per column (checked by brute force), missing is a dash."""
from __future__ import annotations

import itertools
import math
import random

import pandas as pd
import pytest

from harness.report.tables import (
    MISSING,
    Table,
    best_mask,
    format_spread,
    format_value,
    tex_escape,
    to_csv,
    to_html,
    to_latex,
    to_markdown,
)


def brute_best(rows: list[dict], column: str, direction: str) -> set[int]:
    """Indices of the best cells, by the rule written out longhand: same model and bits, baselines excluded, >= 2 values."""
    best = set()
    for i, row in enumerate(rows):
        if row["baseline"] or row[column] is None:
            continue
        rivals = [r[column] for r in rows if not r["baseline"] and r[column] is not None
                  and (r["model"], r["bits"]) == (row["model"], row["bits"])]
        if len(rivals) >= 2 and row[column] == (min(rivals) if direction == "min" else max(rivals)):
            best.add(i)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_best_mask_matches_brute_force(seed):
    rng = random.Random(seed)
    rows = []
    for model, method, bits in itertools.product(["a", "b"], ["fp", "x", "y", "z"], ["W8A8", "W4A4"]):
        if rng.random() < 0.2:
            continue
        pick = lambda: None if rng.random() < 0.25 else float(rng.choice([1, 2, 3, 4]))  # noqa: E731  (ties happen)
        # the baseline is whichever method the sweep flags (a plugin's, say), not a name: here "x"
        rows.append({"model": model, "method": method, "bits": bits, "baseline": method == "x",
                     "ppl": pick(), "acc": pick(), "other": pick()})
    frame = pd.DataFrame(rows)
    mask = best_mask(frame, {"ppl": "min", "acc": "max"})
    for column, direction in (("ppl", "min"), ("acc", "max")):
        assert set(frame.index[mask[column]]) == brute_best(rows, column, direction)
    assert not mask["other"].any() and not mask["model"].any()
    assert "baseline" not in Table(frame, "t", best=mask).frame.columns  # it decides bold, it is not shown


def test_missing_values_never_render_as_zero_or_nan():
    assert format_value(None, "x") is None and format_value(float("nan"), "x") is None and format_value(pd.NA, "x") is None
    assert format_value(0.0, "x") == "0.00" and format_value(0.0123, "device_hours") == "0.0123" and format_value(1.1, "GPU-h ours") == "1.10"
    assert format_value(14.52, "GPU-h paper") == "14.52" and format_value(0.000556, "device_hours") == "0.000556"
    assert format_value(-0.26, "C4 Δ") == "-0.26" and format_value(0.03, "C4 Δ") == "+0.03"
    assert format_value(123456.0, "ppl c4") == "1.23e+05" and format_value(0.04, "load_s") == "0.0"
    frame = pd.DataFrame({"model": ["m"], "method": ["q"], "bits": ["W4A4"], "ppl": [math.nan], "acc": [None], "z": [0.0]})
    table = Table(frame, "t")
    for text in (to_markdown(table), to_html(table), to_csv(table)):
        assert text.count(MISSING) == 2 and "nan" not in text.lower() and "None" not in text
    tex = to_latex(table)
    assert tex.count(" -- ") + tex.count("-- \\\\") == 2 and "nan" not in tex.lower() and "0.00" in tex


def test_latex_is_booktabs_escaped_with_rules_between_models():
    frame = pd.DataFrame({"model": ["a_1", "a_1", "b"], "method": ["fp", "q", "q"], "bits": ["W4A4"] * 3,
                          "ppl %": [1.0, 2.0, 3.0]})
    tex = to_latex(Table(frame, "50% & more", notes=["x_y"]))
    for rule in (r"\toprule", r"\bottomrule", r"\begin{tabular}{lllr}", r"\caption{50\% \& more}", r"ppl \%", "a\\_1", "x\\_y"):
        assert rule in tex
    assert tex.count(r"\midrule") == 2  # after the header and between models a_1 and b
    assert tex_escape("-0.26") == "$-$0.26" and tex_escape("a-b") == "a-b"
    assert tex_escape("{a}~^\\") == r"\{a\}\textasciitilde{}\textasciicircum{}\textbackslash{}"


def brute_best_with_spread(rows: list[dict], column: str, direction: str) -> set[int]:
    """The spread rule longhand: a competitor is bold when it beats every other competitor with a value in its
    group by more than the larger of the two stds (missing std = 0); a group without any std keeps the plain rule."""
    best = set()
    for i, row in enumerate(rows):
        if row["baseline"] or row[column] is None:
            continue
        rivals = [r for r in rows if r is not row and not r["baseline"] and r[column] is not None
                  and (r["model"], r["bits"]) == (row["model"], row["bits"])]
        if not rivals:
            continue
        if all(r[f"{column} std"] is None for r in rivals + [row]):
            if i in brute_best(rows, column, direction):
                best.add(i)
            continue
        own = row[f"{column} std"] or 0.0
        sign = 1 if direction == "min" else -1
        if all(sign * (r[column] - row[column]) > max(own, r[f"{column} std"] or 0.0) for r in rivals):
            best.add(i)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_best_mask_with_spread_matches_brute_force(seed):
    rng = random.Random(seed)
    rows = []
    for model, method, bits in itertools.product(["a", "b"], ["fp", "x", "y", "z"], ["W8A8", "W4A4"]):
        row = {"model": model, "method": method, "bits": bits, "baseline": method == "fp"}
        for column in ("ppl", "acc"):
            row[column] = None if rng.random() < 0.2 else float(rng.choice([10, 11, 12, 14, 20]))
            row[f"{column} std"] = None if rng.random() < (0.3 if bits == "W8A8" else 0.05) else rng.choice([0.0, 0.5, 1.5, 3.0])
        rows.append(row)
    frame = pd.DataFrame([{k: v for k, v in r.items() if not k.endswith(" std")} for r in rows])
    spread = pd.DataFrame([{c: r.get(f"{c} std") for c in frame.columns} for r in rows], dtype=float)
    mask = best_mask(frame, {"ppl": "min", "acc": "max"}, spread=spread)
    for column, direction in (("ppl", "min"), ("acc", "max")):
        assert set(frame.index[mask[column]]) == brute_best_with_spread(rows, column, direction)


def test_spread_rule_cases_by_hand():
    frame = pd.DataFrame({"model": ["m"] * 3, "bits": ["W4A4"] * 3, "ppl": [10.0, 13.0, 20.0]})
    spread = lambda *s: pd.DataFrame({"model": [math.nan] * 3, "bits": [math.nan] * 3, "ppl": list(s)})  # noqa: E731
    best = lambda s: best_mask(frame, {"ppl": "min"}, spread=s)["ppl"].tolist()  # noqa: E731
    assert best(spread(1.0, 2.0, 1.0)) == [True, False, False]  # 13 - 10 = 3 > max(1, 2)
    assert best(spread(1.0, 3.0, 1.0)) == [False, False, False]  # 3 is not more than max(1, 3): inside the spread
    assert best(spread(4.0, 0.0, 0.0)) == [False, False, False]  # the leader's own spread counts too
    assert best(spread(math.nan, math.nan, math.nan)) == [True, False, False]  # one run each: today's rule
    assert best(None) == [True, False, False]


def test_mean_and_spread_render_in_every_format():
    frame = pd.DataFrame({"model": ["m", "m"], "method": ["a", "b"], "ppl": [12.3, 14.0], "wall_s": [61.04, 60.0]})
    spread = pd.DataFrame({"model": [math.nan] * 2, "method": [math.nan] * 2, "ppl": [0.45, math.nan], "wall_s": [2.26, 0.004]})
    table = Table(frame, "t", spread=spread)
    assert "| 12.30 ± 0.45 | 61.0 ± 2.3 |" in to_markdown(table) and "| 14.00 | 60.0 ± 0.0 |" in to_markdown(table)
    assert r"$12.30 \pm 0.45$ & $61.0 \pm 2.3$" in to_latex(table)
    assert "12.30 ± 0.45" in to_html(table)
    back = pd.read_csv(__import__("io").StringIO(to_csv(table)), na_values=MISSING)
    assert list(back.columns) == ["model", "method", "ppl", "ppl std", "wall_s", "wall_s std"]
    assert back["ppl std"].tolist()[0] == 0.45 and format_spread(0.0012, "ppl") == "0.0012"
