"""``ptqbench report DIR``: the comparison table of a results directory."""
from __future__ import annotations

from pathlib import Path

import click

from harness.errors import ConfigError
from harness.report import FORMATS, REFERENCES, report
from harness.results import write_text_atomic

# -o FILE picks the format from its suffix; an unknown suffix is refused (rep.docx must not silently be Markdown).
_SUFFIX_FORMATS = {**{f: f for f in FORMATS}, "markdown": "md", "htm": "html", "latex": "tex"}


@click.command("report")
@click.argument("results_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Output format (default: from -o's suffix, else md).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write here instead of stdout.")
@click.option("--title", default=None, help="Report title.")
@click.option("--reference", type=click.Choice(REFERENCES), default=None,
              help="Put published numbers beside ours (paper: QLLM Table 1 and its training cost).")
def command(results_dir: Path, fmt: str | None, output: Path | None, title: str | None, reference: str | None) -> None:
    """Render a comparison table (rows: model x method x bits; columns: metrics and cost).

    With --reference paper, also our numbers beside the published ones with the difference
    (as CSV: that comparison alone). HTML is one self-contained page with plots.
    """
    if fmt is None:
        fmt = format_of(output)
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
