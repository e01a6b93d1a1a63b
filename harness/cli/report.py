"""``ptqbench report DIR``: the comparison table of a results directory."""
from __future__ import annotations

from pathlib import Path

import click

from harness.errors import ConfigError
from harness.report.render import FORMATS, REFERENCES, report, report_bytes
from harness.atomic import write_bytes_atomic, write_text_atomic

# -o FILE picks the format from its suffix; an unknown suffix is refused (rep.docx must not silently be Markdown).
_SUFFIX_FORMATS = {**{f: f for f in FORMATS}, "markdown": "md", "htm": "html", "latex": "tex", "pq": "parquet"}


@click.command("report")
@click.argument("results_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Output format (default: from -o's suffix, else md).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write here instead of stdout.")
@click.option("--title", default=None, help="Report title.")
@click.option("--reference", type=click.Choice(REFERENCES), default=None,
              help="Put published numbers beside ours (paper: QLLM Table 1 and its training cost).")
def command(results_dir: Path, fmt: str | None, output: Path | None, title: str | None, reference: str | None) -> None:
    """Render a comparison report (pivot tables per metric, then rows model x method x variant x bits;
    cells mean ± std over seeds).

    CSV and Parquet hold the tidy per-run frame (Parquet needs -o). With --reference paper, also our
    numbers beside the published ones (as CSV: that comparison alone). HTML is one self-contained page with plots.
    """
    if fmt is None:
        fmt = format_of(output)
    if fmt == "parquet":
        if output is None or reference is not None:
            raise ConfigError("--format parquet: write the per-run frame to a file with -o FILE.parquet (no --reference)")
        write_bytes_atomic(output, report_bytes(results_dir))
        click.echo(f"wrote {output}")
        return
    text = report(results_dir, fmt, title, reference)
    if output is None:
        click.echo(text, nl=False)
        return
    write_text_atomic(output, text, "report")
    click.echo(f"wrote {output}")


def format_of(output: Path | None) -> str:
    """The format ``-o`` asks for by its suffix (Markdown on stdout); ``ConfigError`` for a suffix we do not write."""
    if output is None:
        return "md"
    suffix = output.suffix.lstrip(".").lower()
    if suffix not in _SUFFIX_FORMATS:
        allowed = ", ".join(f".{s}" for s in _SUFFIX_FORMATS)
        raise ConfigError(f"-o: suffix {output.suffix or '(none)'!r} of {str(output)!r} is not a report format; "
                          f"use one of {allowed}, or name the format with --format")
    return _SUFFIX_FORMATS[suffix]
