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
        tags = [t for t in ("baseline" if cls.is_baseline else "", "" if source == "builtin" else source) if t]
        click.echo(f"{name:<{width}}  {cls.description}" + (f"  [{'; '.join(tags)}]" if tags else ""))
        if options:
            for f in dataclasses.fields(cls.config_class):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                click.echo(f"{'':<{width}}    {f.name} = {default!r}")
    for name, error in REGISTRY.load_errors.items():
        click.echo(f"{name:<{width}}  (failed to load: {error})", err=True)
