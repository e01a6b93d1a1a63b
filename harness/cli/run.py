"""``ptqbench run CONFIG.yaml``: validate a sweep, run what is not done yet, print where results are."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from harness.engine.memory import estimate
from harness.errors import ConfigError
from harness.quiet import quiet_requested
from harness.run.config import SweepConfig, load_config, with_task_data
from harness.run.execute import plan
from harness.run.preflight import check_device
from harness.run.sweep import run_sweep

log = logging.getLogger(__name__)


@click.command("run")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results directory (default: runs/<config name>).")
@click.option("--force", is_flag=True, help="Redo runs whose results already exist.")
@click.option("--dry-run", is_flag=True, help="Validate and list the planned runs with their estimated peak memory, run nothing.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Overrides the YAML's device.")
@click.option("--seed", type=int, default=None, help="Overrides the YAML's seed (and seeds): one seed.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Overrides the YAML's threads: torch CPU threads per run.")
@click.option("--seeds", "seeds_text", default=None, metavar="0,1,2",
              help="Overrides the YAML's seeds: every run once per seed (comma-separated integers).")
@click.option("--executor", type=click.Choice(["local", "ray", "slurm"]), default=None,
              help="Where runs execute; overrides the YAML's executor.kind (default local).")
@click.option("--ray-address", default=None, help="Join this Ray cluster ('auto', 'ray://head:10001'); implies --executor ray.")
@click.option("--task-data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local copies of the zero-shot tasks' data (<task>/<split>.jsonl); overrides the YAML's.")
@click.option("--progress/--no-progress", default=True, help="Progress bars.")
def command(config_path: Path, out_dir: Path | None, force: bool, dry_run: bool, device: str | None,
            seed: int | None, threads: int | None, seeds_text: str | None, executor: str | None, ray_address: str | None, task_data: Path | None, progress: bool) -> None:
    """Run the sweep described by CONFIG (models x methods x bit specs)."""
    import dataclasses

    config = load_config(config_path)
    overrides = {k: v for k, v in (("device", device), ("seed", seed), ("threads", threads)) if v is not None}
    if seed is not None:
        overrides["seeds"] = ()  # --seed means exactly that one seed
    if seeds_text is not None:
        overrides["seeds"] = parse_seeds(seeds_text)
    config = dataclasses.replace(config, **overrides) if overrides else config
    config = with_executor(config, executor, ray_address)
    if task_data is not None:
        config = with_task_data(config, str(task_data))
    check_device(config.device, config.executor.kind)
    out_dir = out_dir or Path("runs") / config.name
    runs = plan(config)
    if dry_run:
        for r in runs:
            est = estimate(r)
            click.echo(f"{r.key}  {r.label} seed {r.seed}  {est.describe() if est else 'memory: unknown (model config not available)'}")
        return
    log.info("%d runs planned; results in %s", len(runs), out_dir)
    summary = run_sweep(config, out_dir, force=force, progress=progress and not quiet_requested())
    held = f", {len(summary.held)} held by another process" if summary.held else ""
    click.echo(f"{len(summary.done)} run, {len(summary.skipped)} already done{held}, {len(summary.failed)} failed; results in {out_dir}")
    for key, error in summary.failed.items():
        click.echo(f"failed {key}: {error} (details: {out_dir / 'failed' / (key + '.json')})", err=True)
    if config.export:
        click.echo(f"{len(summary.exported)} exported to {out_dir / 'export'}, {len(summary.export_failed)} failed")
    for key, error in summary.export_failed.items():
        click.echo(f"export failed {key}: {error}", err=True)
    if summary.failed or summary.export_failed:
        sys.exit(1)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,2`` as a tuple of integers; a bad item is a one-line ``ConfigError``."""
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--seeds: {text!r} is not allowed; use comma-separated integers such as 0,1,2") from None
    if not seeds:
        raise ConfigError("--seeds: empty; use comma-separated integers such as 0,1,2")
    return seeds


def with_executor(config: SweepConfig, kind: str | None, ray_address: str | None) -> SweepConfig:
    """Apply ``--executor`` / ``--ray-address`` over the YAML's ``executor:`` section."""
    import dataclasses

    ex = config.executor
    if ray_address is not None:
        if (kind or "ray") != "ray":
            raise ConfigError(f"--ray-address: only used with --executor ray, not --executor {kind}")
        ex = dataclasses.replace(ex, kind="ray", ray=dataclasses.replace(ex.ray, address=ray_address))
    if kind is not None:
        ex = dataclasses.replace(ex, kind=kind)
    return dataclasses.replace(config, executor=ex)
