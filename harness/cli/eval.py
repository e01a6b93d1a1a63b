"""``ptqbench eval DIR_OR_MODEL``: evaluate a saved model with a sweep's evaluation code and result format.

DIR_OR_MODEL is an export (ptqbench or compressed-tensors folder), any Hugging Face folder or hub
id, or a zoo name. The result is stored as ``<out>/runs/<key>.json`` (default out: runs/eval), so
``ptqbench report`` reads it beside sweep results.
"""
from __future__ import annotations

from pathlib import Path

import click

from harness import schema
from harness.run.eval_saved import evaluate_saved
from harness.quiet import quiet_requested
from harness.evaluation.config import EvaluationConfig
from harness.run.results import ResultStore


@click.command("eval")
@click.argument("target", metavar="DIR_OR_MODEL")
@click.option("--ppl", "ppl", multiple=True, default=("brown",), show_default=True,
              help="Perplexity dataset (repeat for several): brown, wikitext2, c4 or a text file.")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Perplexity window length.")
@click.option("--max-windows", type=int, default=None, help="Score only the first N windows.")
@click.option("--tasks", default="", help="Comma-separated lm-eval tasks (e.g. brown_cloze,piqa); empty = none.")
@click.option("--limit", type=int, default=None, help="Zero-shot: first N examples per task.")
@click.option("--task-data", type=click.Path(file_okay=False, path_type=Path), default=None, help="Local copies of the tasks' data.")
@click.option("--log-samples", is_flag=True, help="Write lm-eval's per-sample logs to <out>/samples/<key>/<task>.jsonl.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/eval"), show_default=True,
              help="Results directory to store the result in.")
def command(target: str, ppl: tuple[str, ...], seqlen: int, max_windows: int | None, tasks: str, limit: int | None,
            task_data: Path | None, log_samples: bool, device: str, dtype: str, seed: int, out_dir: Path) -> None:
    """Evaluate DIR_OR_MODEL (perplexity and zero-shot) and store the result like a sweep run."""
    from harness.data.windows import check_dataset_name
    from harness.evaluation.zeroshot import check_tasks
    from harness.models import check_model_name

    evaluation = schema.from_dict(EvaluationConfig, {
        "ppl": {"datasets": list(ppl), "seqlen": seqlen, "max_windows": max_windows},
        "zeroshot": {"tasks": [t.strip() for t in tasks.split(",") if t.strip()], "limit": limit,
                     "task_data": str(task_data) if task_data else None, "log_samples": log_samples},
    }, "eval")
    check_model_name(target)
    for name in evaluation.ppl.datasets:
        check_dataset_name(name)
    check_tasks(evaluation.zeroshot)
    record = evaluate_saved(target, evaluation, device=device, dtype=dtype, seed=seed, progress=not quiet_requested())
    path = ResultStore(out_dir).write(record.key, record)
    for name, value in record.ppl.items():
        click.echo(f"ppl {name}: {value:.4f}")
    if "zeroshot" in record.metrics and record.metrics["zeroshot"]["average"] is not None:
        click.echo(f"zero-shot average: {100 * record.metrics['zeroshot']['average']:.2f}%")
    click.echo(f"result: {path}")
