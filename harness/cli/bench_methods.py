"""``ptqbench bench-methods``: each method's quantize seconds beside its official code's."""
from __future__ import annotations

import click

from harness.bench.methods import bench_methods, load_official


@click.command("bench-methods")
@click.option("--methods", default="", help="Comma-separated method names (default: every timed method).")
@click.option("--threads", type=int, default=None, help="torch threads (default: the official timings' count).")
def command(methods: str, threads: int | None) -> None:
    """Time ptqbench's methods at the settings whose official seconds ship with ptqbench; print both and the ratio.

    Run it alone on the machine: another process on the same cores invalidates every ratio.
    """
    reference = load_official()
    results = bench_methods(tuple(m for m in methods.split(",") if m), threads=threads, reference=reference)
    click.echo(f"official seconds: {reference.machine}, measured {reference.date}; "
               f"{reference.model}, calibration {reference.calibration['samples']} x {reference.calibration['seqlen']}")
    click.echo(f"{'setting':<16} {'threads':>7} {'ours s':>8} {'official s':>10} {'ratio':>6} {'goal':>6}  "
               f"{'ours ppl':>10} {'official ppl':>12}")
    for r in results:
        t = r.timing
        verdict = "ok" if r.ratio <= t.goal else "over"
        click.echo(f"{t.label:<16} {threads or t.threads:>7} {r.seconds:>8.1f} {t.official_s:>10.1f} {r.ratio:>6.2f} {t.goal:>6.2f}  "
                   f"{r.ppl:>10.4f} {t.official_ppl:>12.4f}  {verdict}")
    for t in {r.timing.conditions for r in results}:
        click.echo(f"official timed with: {t}")
