"""``ptqbench prepare``: fill the shared cache before a sweep (Brown corpus, models, datasets).

Hundreds of cluster jobs should not all hit the hub at once: run this once on a login node, e.g.
``ptqbench prepare --model llama-2-70b --dataset wikitext2 --dataset c4``.
"""
from __future__ import annotations

from pathlib import Path

import click

from harness import brown
from harness.data import resolve_corpus
from harness.models import ZOO, hub_folder, load_model


@click.command("prepare")
@click.option("--model", "models", multiple=True, default=("smollm2-135m",), show_default=True,
              help="Models to fetch into the cache: zoo names or hub ids (hub models are downloaded, not loaded).")
@click.option("--dataset", "datasets", multiple=True, default=("brown",), show_default=True,
              help="Corpora whose train and test text to fetch (brown, wikitext2, c4).")
@click.option("--force", is_flag=True, help="Re-fetch the Brown corpus.")
def command(models: tuple[str, ...], datasets: tuple[str, ...], force: bool) -> None:
    """Prepare the Brown corpus, models and datasets in the cache (idempotent)."""
    click.echo(f"brown: {brown.prepare(force=force)}")
    for name in models:
        local = name in ZOO or Path(name).expanduser().exists()
        hub_id = ZOO[name].hub_id if name in ZOO else (None if local or name.count("/") != 1 else name)
        if hub_id is not None:
            folder = hub_folder(hub_id, download=True)
            click.echo(f"{name}: {folder if folder else 'not available (offline, gated, or no safetensors weights)'}")
        else:
            click.echo(f"{name}: {load_model(name, lazy=True).source}")
    for name in datasets:
        corpus = resolve_corpus(name)
        click.echo(f"{name}: {len(corpus.train())} train / {len(corpus.test())} test characters")
