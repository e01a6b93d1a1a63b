"""Render one table in Markdown, CSV, LaTeX (booktabs) or HTML, with best values in bold.

A ``Table`` is a pandas frame whose cells are numbers (``None``/NaN = missing) or text, plus
what the renderers need to know: which cells are best (bold), which are marked with a dagger
(e.g. published values we have not run), and footnotes. Every format shows a missing value as
a dash, never 0 or NaN: ``–`` in Markdown, HTML and CSV (read it back with
``pd.read_csv(path, na_values="–")``), ``--`` in LaTeX (which typesets as an en dash).

A cell may carry a spread (``Table.spread``, the std over seeds): it renders as ``12.30 ± 0.45``
(``$12.30 \\pm 0.45$`` in LaTeX); NaN spread (one run) renders the value alone.

"Best" is decided per column by ``best_mask``: within each group of rows that compete (same
model and bit spec), among quantized methods only (rows whose ``baseline`` column is true are the
reference, not competitors; the column itself is never displayed), the lowest or highest value as
the column's direction says, and nothing is bold where fewer than two methods have a value (a lone
entry beats no one). Without spreads (every cell one run) ties are all bold. Where the group has
spreads, a cell is bold only when it is better than every other competitor's value by more than
``max(its std, the other's std)`` (a missing std counts as 0): a lead inside the noise is no lead.
"""
from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

MISSING = "–"
MARK = "†"
BASELINE = "baseline"  # bool column: the reference rows (Method.is_baseline), hidden from display
GROUP = ("model", "bits")


@dataclass
class Table:
    frame: pd.DataFrame
    title: str
    best: pd.DataFrame | None = None  # bool, same shape as frame: cells shown in bold
    marked: pd.DataFrame | None = None  # bool, same shape: cells that get MARK
    notes: list[str] = field(default_factory=list)
    mark_label: str = "marked"  # CSV has no dagger: a column of this name lists each row's marked columns
    spread: pd.DataFrame | None = None  # float, same shape: the std shown as "± std" (NaN: none)

    def __post_init__(self) -> None:
        if BASELINE in self.frame.columns:  # it decided bold (best_mask); readers see the method name
            self.frame = self.frame.drop(columns=[BASELINE])


def is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def format_value(value: object, column: str) -> str | None:
    """Display text of one cell; ``None`` when missing. Deltas carry their sign."""
    if is_missing(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (column == "n" and float(value).is_integer()):  # counts (n runs) stay counts,
        return str(int(value))  # also where a missing cell made pandas store the column as floats
    v = float(value)
    if column.endswith("Δ"):
        return f"{v:+.3g}" if abs(v) >= 1e5 else f"{v:+.2f}"
    if abs(v) >= 1e5:
        return f"{v:.3g}"
    if column.endswith(("_s", " s")):  # phase times: a tenth of a second is plenty
        return f"{v:.1f}"
    if ("device_hours" in column or "GPU-h" in column) and 0 < abs(v) < 1:  # seconds on a CPU: 3 digits, not 0.00
        return f"{v:#.3g}"
    if v == 0 or abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"  # device-hours of small runs: keep three significant digits, not 0.00


def format_spread(value: object, column: str) -> str | None:
    """Display text of a std next to its mean (``None`` when there is none): the mean's precision,
    except that a small non-zero spread keeps two significant digits instead of rounding to 0.00."""
    if is_missing(value):
        return None
    v = abs(float(value))
    if column.endswith(("_s", " s")):
        return f"{v:.1f}"
    if "device_hours" in column and 0 < v < 1:
        return f"{v:.2g}"
    if v == 0 or v >= 0.005:
        return f"{v:.2f}"
    return f"{v:.2g}"


def _ahead(a: float, b: float, margin: float, direction: str) -> bool:
    return a < b - margin if direction == "min" else a > b + margin


def _best_of(vals: pd.Series, spreads: pd.Series | None, direction: str) -> list:
    """Index labels of the bold cells of one group (values without NaN, at least two)."""
    target = vals.min() if direction == "min" else vals.max()
    if spreads is None or spreads.reindex(vals.index).isna().all():  # one run per cell: today's rule, ties all bold
        return list(vals.index[vals == target])
    std = spreads.reindex(vals.index).fillna(0.0).abs()
    return [i for i in vals.index[vals == target]
            if all(_ahead(vals[i], vals[j], max(std[i], std[j]), direction) for j in vals.index if j != i)]


def best_mask(frame: pd.DataFrame, directions: Mapping[str, str], group: Sequence[str] = GROUP,
              spread: pd.DataFrame | None = None) -> pd.DataFrame:
    """True where a cell is the best of its column within its group (see the module docstring);
    ``spread`` (stds, same shape as ``frame``) switches on the rule for repeated runs."""
    mask = pd.DataFrame(False, index=frame.index, columns=frame.columns)
    if frame.empty:
        return mask
    keys = [g for g in group if g in frame.columns]
    competitors = frame[~frame[BASELINE].astype(bool)] if BASELINE in frame.columns else frame
    for column, direction in directions.items():
        if column not in frame.columns or direction not in ("min", "max"):
            continue
        values = pd.to_numeric(competitors[column], errors="coerce")
        groups = values.groupby([competitors[k] for k in keys]) if keys else [(None, values)]
        spreads = pd.to_numeric(spread[column], errors="coerce") if spread is not None and column in spread else None
        for _, vals in groups:
            vals = vals.dropna()
            if len(vals) < 2:
                continue
            mask.loc[_best_of(vals, spreads, direction), column] = True
    return mask


def bold_note(spread: bool, what: str = "model and bit spec",
              criteria: str = "lowest perplexity, device-hours and peak memory; highest accuracy") -> str:
    """The legend of bold (``best_mask``): which cells compete, what is best and, with seeds, the spread rule."""
    text = f"Bold: best per column among quantized methods of the same {what} ({criteria})"
    if spread:
        text += ("; with several seeds, only where the best mean beats every other method's mean by more than "
                 "the larger of the two stds (a lead inside the spread is not bold)")
    return text + "."


def _cells(table: Table, missing: str, bold: str, mark: str, escape, pm: str = "{} ± {}") -> list[list[str]]:
    """Rendered cell texts; ``pm`` formats a mean with its spread (already markup, not escaped)."""
    rows = []
    for i, (idx, row) in enumerate(table.frame.iterrows()):
        cells = []
        for column in table.frame.columns:
            text = format_value(row[column], column)
            if text is None:
                cells.append(missing)
                continue
            spread = None
            if table.spread is not None and column in table.spread.columns:
                spread = format_spread(table.spread.at[idx, column], column)
            text = pm.format(text, spread) if spread is not None else escape(text)
            if table.best is not None and bool(table.best.at[idx, column]):
                text = bold.format(text)
            if table.marked is not None and bool(table.marked.at[idx, column]):
                text += mark
            cells.append(text)
        rows.append(cells)
    return rows


def _numeric(frame: pd.DataFrame, column: str) -> bool:
    """Right-align numbers; a column of dashes only is a metric we lack, so it aligns as numbers too."""
    values = [v for v in frame[column] if not is_missing(v)]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def to_markdown(table: Table, level: int = 2) -> str:
    cols = list(table.frame.columns)
    esc = lambda s: s.replace("|", r"\|")  # noqa: E731
    lines = [f"{'#' * level} {table.title}", ""]
    lines.append("| " + " | ".join(esc(str(c)) for c in cols) + " |")
    lines.append("|" + "|".join("---:" if _numeric(table.frame, c) else ":---" for c in cols) + "|")
    for cells in _cells(table, MISSING, "**{}**", MARK, esc):
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"{note}  " for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def to_csv(table: Table) -> str:
    """Numbers at full precision (no bold); missing cells are ``–``; marks become one column, and each
    column with spreads gets a ``<column> std`` column after it."""
    frame = table.frame
    if table.spread is not None:
        columns = {}
        for c in frame.columns:
            columns[c] = frame[c]
            if c in table.spread.columns and table.spread[c].notna().any():
                columns[f"{c} std"] = table.spread[c]
        frame = pd.DataFrame(columns, index=frame.index)
    if table.marked is not None and table.marked.to_numpy().any():
        names = [";".join(c for c in frame.columns if table.marked.at[i, c]) or None for i in frame.index]
        frame = frame.assign(**{table.mark_label: names})
    return frame.to_csv(index=False, na_rep=MISSING)


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                MISSING: "--", "Δ": r"$\Delta$", MARK: r"$^\dagger$"}


def tex_escape(text: str) -> str:
    text = str(text)
    if text[:1] == "-" and text[1:2].isdigit():  # a minus sign, not a hyphen
        return "$-$" + tex_escape(text[1:])
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``); rules between models."""
    cols = list(table.frame.columns)
    spec = "".join("r" if _numeric(table.frame, c) else "l" for c in cols)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{tex_escape(table.title)}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(tex_escape(c) for c in cols) + r" \\", r"\midrule"]
    models = list(table.frame["model"]) if "model" in cols else [None] * len(table.frame)
    for i, cells in enumerate(_cells(table, "--", r"\textbf{{{}}}", r"$^\dagger$", tex_escape, pm=r"${} \pm {}$")):
        if i and models[i] != models[i - 1]:
            lines.append(r"\midrule")
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines += [r"\par\smallskip\footnotesize"] + [tex_escape(n) + r"\\" for n in table.notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    """An HTML fragment: heading, table, notes (the page around it is ``harness.report.htmlpage``)."""
    cols = list(table.frame.columns)
    numeric = [_numeric(table.frame, c) for c in cols]
    out = [f"<h2>{html.escape(table.title)}</h2>", "<table>", "<thead><tr>"]
    out += [f"<th>{html.escape(str(c))}</th>" for c in cols]
    out.append("</tr></thead><tbody>")
    missing = f'<span class="missing">{MISSING}</span>'
    for cells in _cells(table, missing, "<strong>{}</strong>", f"<sup>{MARK}</sup>", html.escape):
        tds = "".join(f'<td class="num">{c}</td>' if n else f"<td>{c}</td>" for c, n in zip(cells, numeric))
        out.append(f"<tr>{tds}</tr>")
    out.append("</tbody></table>")
    out += [f'<p class="note">{html.escape(n)}</p>' for n in table.notes]
    return "\n".join(out) + "\n"


RENDERERS = {"md": to_markdown, "csv": to_csv, "tex": to_latex, "html": to_html}
