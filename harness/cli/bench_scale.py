"""``ptqbench bench-scale``: peak host memory of whole runs on synthetic 32- and 8-layer LLaMAs (see harness.bench.scale)."""
from __future__ import annotations

import shutil

import click

from harness.bench.scale import OPTIONS, bench_root, disk_size, generate, measure, method_options, prepare_tokens, table
from harness.engine.allocator import ALLOCATORS


@click.command("bench-scale")
@click.option("--hidden", default=2048, show_default=True)
@click.option("--layers", default="32,8", show_default=True, help="Comma-separated depths; the first two give the ratio.")
@click.option("--methods", "method_names", default=",".join(OPTIONS), show_default=True,
              help="Comma-separated; 'omniquant:low-memory' runs a method with its low_memory option.")
@click.option("--samples", default=4, show_default=True, help="Calibration windows.")
@click.option("--seqlen", default=128, show_default=True)
@click.option("--windows", default=2, show_default=True, help="Perplexity windows.")
@click.option("--host-allocator", type=click.Choice(sorted(ALLOCATORS)), default="default", show_default=True,
              help="The allocator each measured process starts with (executor.host_allocator; see harness/engine/allocator.py).")
@click.option("--keep-models/--delete-models", default=True, show_default=True, help="Keep the generated models in the cache.")
def command(hidden: int, layers: str, method_names: str, samples: int, seqlen: int, windows: int, host_allocator: str,
            keep_models: bool) -> None:
    """Print model size on disk, peak RSS, the dry-run estimate and the deep/shallow peak-RSS ratio per method.

    Targets: peak RSS <= half the size on disk; deep/shallow ratio <= 1.15.
    """
    labels = method_names.split(",")
    for label in labels:
        method_options(label)  # a bad name fails before any model is generated
    rows = []
    folders = []
    for depth in (int(x) for x in layers.split(",")):
        folder = generate(bench_root() / f"llama-h{hidden}-l{depth}", hidden, depth)
        folders.append(folder)
        prepare_tokens(folder)
        click.echo(f"{folder}: {disk_size(folder) / 2**30:.2f} GB on disk")
        for method in labels:
            rows.append(measure(folder, method, samples, seqlen, windows, host_allocator))
            click.echo(f"  {method}: peak RSS {rows[-1].peak_rss / 2**30:.2f} GB", err=True)
    click.echo(table(rows))
    if not keep_models:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
