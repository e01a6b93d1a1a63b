"""``ptqbench bench-engine``: peak memory of the block-wise engine at two depths of one width."""
from __future__ import annotations

import click

from harness.bench.engine import engine_memory


@click.command("bench-engine")
@click.option("--depths", default="4,16", show_default=True, help="Comma-separated layer counts.")
@click.option("--hidden", default=256, show_default=True)
@click.option("--samples", default=4, show_default=True)
@click.option("--seqlen", default=128, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def command(depths: str, hidden: int, samples: int, seqlen: int, device: str) -> None:
    """Print the engine's peak memory against model size; the peak must not grow with depth."""
    try:
        layer_counts = tuple(int(d) for d in depths.split(","))
    except ValueError:
        raise click.BadParameter(f"{depths!r}: use comma-separated integers, e.g. 4,16", param_hint="--depths") from None
    results = engine_memory(layer_counts, hidden, samples, seqlen, device)
    mib = 2**20
    click.echo(f"random LLaMA, hidden {hidden}, {samples} x {seqlen} tokens, device {results[0].device}")
    click.echo(f"{'layers':>6} {'model MiB':>10} {'block MiB':>10} {'engine peak MiB':>16} {'seconds':>8}")
    for r in results:
        click.echo(f"{r.layers:>6} {r.model_bytes / mib:>10.1f} {r.block_bytes / mib:>10.2f} {r.peak_bytes / mib:>16.1f} {r.seconds:>8.1f}")
    growth = results[-1].peak_bytes / max(results[0].peak_bytes, 1)
    click.echo(f"peak ratio deepest/shallowest = {growth:.2f} (model size ratio "
               f"{results[-1].model_bytes / results[0].model_bytes:.2f}); bounded if close to 1")
