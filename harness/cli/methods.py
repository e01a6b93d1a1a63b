"""``ptqbench methods``: the registered methods, their options and where they come from."""
from __future__ import annotations

import dataclasses

import click

from harness.registry import REGISTRY


@click.command("methods")
@click.option("--options/--no-options", default=False, help="Also list each method's options and defaults.")
def command(options: bool) -> None:
    """List registered quantization methods."""
    names = REGISTRY.names()
    width = max(len(n) for n in names)
    for name in names:
        cls = REGISTRY.get(name)
        source = REGISTRY.source(name)
        click.echo(f"{name:<{width}}  {cls.description}" + ("" if source == "builtin" else f"  [{source}]"))
        if options:
            for f in dataclasses.fields(cls.config_class):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                click.echo(f"{'':<{width}}    {f.name} = {default!r}")
    for name, error in REGISTRY.load_errors.items():
        click.echo(f"{name:<{width}}  (plugin failed to load: {error})", err=True)
