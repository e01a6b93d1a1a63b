"""``ptqbench export RUN --out DIR``: write a stored run's quantized model as a Hugging Face folder.

RUN is a result JSON (``runs/demo/runs/<key>.json``) or a run key (looked up in ``--results``, by
default every results dir under ``runs/``). The model its sweep kept (``keep_quantized``) is
copied; otherwise the run is quantized again from its stored config (``harness.run.export_run``).
The folder is compressed-tensors when the format can express the model, else ptqbench's own
(``harness.export.formats``). Prints the format and the folder's size.
"""
from __future__ import annotations

from pathlib import Path

import click

from harness.export.formats import human_size
from harness.run.export_run import export_run, kept_model, locate
from harness.quiet import quiet_requested
from harness.run.results import ResultStore


@click.command("export")
@click.argument("run", metavar="RUN")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--results", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Results directory holding the run key (default: search runs/*).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Quantize again on this device (default: the run's; a model the sweep kept is copied instead).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def command(run: str, out_dir: Path, results: Path | None, device: str | None, force: bool) -> None:
    """Export RUN's quantized model (compressed-tensors, or ptqbench's format) to --out."""
    path = locate(run, results)
    store = ResultStore(path.parent.parent)
    record = store.read(path)
    kept = kept_model(store.root, record.key) if device is None else None  # --device asks for a new quantization
    result = export_run(record, out_dir, device=device, progress=not quiet_requested(), overwrite=force, kept=kept)
    click.echo(f"exported {record.model} {record.method} {record.bits} ({record.key}) to {result.path}: "
               f"{result.format}, {human_size(result.size_bytes)} ({result.size_bytes} bytes)")
    if result.reason:
        click.echo(f"ptqbench format because {result.reason}; load with ptqbench.load_quantized({str(result.path)!r})")
