"""The ``ptqbench`` command line. Each subcommand is a small module of this package."""
from __future__ import annotations

import logging
import sys

import click

from harness import __version__
from harness.errors import PtqbenchError
from harness.quiet import silence_progress


class _Group(click.Group):
    """Turns user errors into one ``Error: ...`` line and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except PtqbenchError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, "--version", prog_name="ptqbench", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (lm-eval's and Hugging Face's included), warnings only.")
def main(verbose: int, quiet: bool) -> None:
    """ptqbench: post-training quantization methods for LLMs, head to head."""
    level = logging.WARNING - 10 * min(verbose, 2) if verbose else logging.INFO
    if quiet:
        level = logging.WARNING
        silence_progress()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _register() -> None:
    from harness.cli import bench, bench_engine, bench_methods, bench_scale, eval as eval_, export, methods, prepare, report, run

    for module in (methods, run, report, export, eval_, prepare, bench, bench_engine, bench_methods, bench_scale):
        main.add_command(module.command)


_register()
