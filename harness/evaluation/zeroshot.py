"""Zero-shot accuracy of the in-memory (quantized) model through lm-evaluation-harness.

The model is handed to lm-eval as an object (``HFLM(pretrained=model, tokenizer=...)``) and scored
with ``simple_evaluate``, so prompts, normalisation and metrics are lm-eval's own::

    zeroshot(model, tokenizer, ZeroShotConfig(tasks=("brown_cloze",), limit=100), device=device)

Task names are any lm-eval task (``piqa``, ``arc_easy``, ``arc_challenge``, ``hellaswag``,
``winogrande``, ... read from the hub or the HF cache), the offline ``brown_nextsent`` and
``brown_cloze`` (see ``harness.evaluation.zeroshot_tasks``), or standard tasks read from local files given by
``task_data``. Datasets lm-eval converts are cached under ``$PTQBENCH_HOME/hf-datasets`` (or
``$HF_DATASETS_CACHE`` when the user set it). The hub is switched to offline mode only while every
requested task is local, so users with hub access still get the standard tasks.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.environ import environment
from harness.errors import ConfigError, did_you_mean
from harness.evaluation.zeroshot_tasks import BROWN_TASKS, brown_task_dir, write_task_data_yamls
from harness.paths import cache_home

# The metric compared with the papers' tables (docs/zeroshot.md): their old lm-eval fork
# reported both; their FP16 rows match acc_norm for HellaSwag and acc for PIQA and ARC-c. The
# HellaSwag-like Brown task follows HellaSwag.
HEADLINE_METRIC = {"hellaswag": "acc_norm", "brown_nextsent": "acc_norm"}
FIND_TASKS = "see `lm-eval ls tasks` for lm-eval's task names"


@dataclass(frozen=True)
class ZeroShotConfig:
    """Args:
    tasks: lm-eval task names (piqa, arc_easy, arc_challenge, hellaswag, winogrande, ...) and the
        offline brown_nextsent, brown_cloze; empty = no zero-shot evaluation.
    limit: score only the first N examples of each task (null = all); recorded with every result.
    batch_size: lm-eval requests per forward pass.
    num_fewshot: in-context examples (the papers: 0).
    task_data: folder with local copies of the standard tasks' data, <task>/<split>.jsonl or .parquet
        in the hub's column schema (null = the hub or the HF cache).
    log_samples: keep lm-eval's per-sample log (prompt, choices, log-likelihoods, score) of every
        task; a sweep writes it beside the result as samples/<run key>/<task>.jsonl. Not part of the run key.
    """

    tasks: tuple[str, ...] = ()
    limit: int | None = None
    batch_size: int = 8
    num_fewshot: int = 0
    task_data: str | None = None
    log_samples: bool = False

    def __post_init__(self) -> None:
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks: {list(self.tasks)} lists a task twice; list each task once")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: {self.limit} is not allowed; use a positive integer or null")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: {self.batch_size} is not allowed; use a positive integer")
        if self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot: {self.num_fewshot} is not allowed; use an integer >= 0")


def headline_metric(task: str) -> str:
    return HEADLINE_METRIC.get(task, "acc")


@lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...]) -> Any:
    """lm-eval's built-in tasks plus ``include``; indexing the ~14k built-ins takes seconds, so once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None)


def _builtin_index() -> dict[str, Any]:
    return _task_manager(()).task_index


def check_tasks(cfg: ZeroShotConfig) -> Path | None:
    """Raise ``ConfigError`` for a task name lm-eval does not know or task data that cannot serve it.

    Returns the folder of generated task-data YAMLs (None without ``task_data``). Costs nothing for
    the Brown tasks; any other name needs lm-eval's index (built once per process).
    """
    others = [t for t in cfg.tasks if t not in BROWN_TASKS]
    if not others:
        return None
    index = _builtin_index()
    for i, name in enumerate(cfg.tasks):
        if name in BROWN_TASKS:
            continue
        if name not in index:
            raise ConfigError(f"evaluation.zeroshot.tasks[{i}]: unknown task {name!r}"
                              f"{did_you_mean(name, [*index, *BROWN_TASKS])}; {FIND_TASKS}, plus {', '.join(BROWN_TASKS)}")
        if cfg.task_data is not None and index[name].yaml_path is None:
            raise ConfigError(f"evaluation.zeroshot.tasks[{i}]: {name!r} is a tag, not a task; "
                              f"with task_data list its tasks one by one")
    if cfg.task_data is not None:
        if not Path(cfg.task_data).expanduser().is_dir():
            raise ConfigError(f"evaluation.zeroshot.task_data: {cfg.task_data!r} is not a folder")
        return write_task_data_yamls(others, index, cfg.task_data)  # checks every task's split files
    return None


def datasets_cache() -> Path:
    """Where ``datasets`` keeps what it converts: the user's ``HF_DATASETS_CACHE`` if set, else ours."""
    return Path(os.environ.get("HF_DATASETS_CACHE") or cache_home() / "hf-datasets").expanduser()


@contextlib.contextmanager
def _datasets_env(offline: bool) -> Iterator[None]:
    """Point ``datasets`` at our cache, and at no network while ``offline``; restore afterwards.

    Both libraries read these settings once at import (transformers has imported them long before),
    so the module constants are patched besides the environment.
    """
    import datasets
    import huggingface_hub.constants as hub

    saved = (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    datasets.config.HF_DATASETS_CACHE = datasets_cache()
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        with environment({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} if offline else {}):
            yield
    finally:
        datasets.config.HF_DATASETS_CACHE, datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _task_manager_for(cfg: ZeroShotConfig) -> tuple[Any, bool]:
    """The task manager serving ``cfg.tasks``, and whether every task is local (offline)."""
    include: list[str] = []
    hub_tasks = [t for t in cfg.tasks if t not in BROWN_TASKS]
    if any(t in BROWN_TASKS for t in cfg.tasks):
        include.append(str(brown_task_dir()))
    task_data_dir = check_tasks(cfg)
    if task_data_dir is not None:
        include.append(str(task_data_dir))
        hub_tasks = []
    if hub_tasks:
        return _task_manager(tuple(include)), False
    # Generated YAMLs include the installed task files by absolute path, so lm-eval's own index is
    # not needed; this small index is rebuilt every time (the task-data folder's YAMLs change).
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=False), True


def _task_entry(task: str, results: dict[str, Any]) -> dict[str, Any]:
    row = results["results"][task]
    config = results["configs"].get(task, {})
    entry: dict[str, Any] = {}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in row:
            entry[metric] = row[f"{metric},none"]
            stderr = row.get(f"{metric}_stderr,none")
            # lm-eval reports NaN stderr for a single example; JSON has no NaN, and None says "undefined".
            entry[f"{metric}_stderr"] = stderr if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
    entry["metric"] = headline_metric(task) if headline_metric(task) in entry else "acc"
    entry["version"] = results["versions"].get(task)
    entry["samples"] = results.get("n-samples", {}).get(task, {}).get("effective")
    entry["split"] = config.get("test_split") or config.get("validation_split")
    entry["data"] = {"path": config.get("dataset_path"), "name": config.get("dataset_name"),
                     **({"files": config["dataset_kwargs"].get("data_files")} if config.get("dataset_kwargs") else {})}
    return entry


@torch.no_grad()
def zeroshot(model: nn.Module, tokenizer: Any, cfg: ZeroShotConfig, *, device: torch.device) -> dict[str, Any]:
    """Score ``model`` on ``cfg.tasks`` with lm-eval; per-task acc/acc_norm (+ stderr), versions, average
    (plus ``samples``, lm-eval's per-item log by task, with ``cfg.log_samples``).

    ``average`` is the mean over the scored tasks of each task's headline metric (``HEADLINE_METRIC``).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager, offline = _task_manager_for(cfg)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(device))
    with _datasets_env(offline):
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            task_manager=manager, log_samples=cfg.log_samples, batch_size=cfg.batch_size,
        )
    tasks = {task: _task_entry(task, results) for task in results["configs"] if task in results["results"]}
    scored = [e[e["metric"]] for e in tasks.values() if e["metric"] in e]
    summary = {
        "tasks": tasks,
        "average": sum(scored) / len(scored) if scored else None,
        "lm_eval_version": lm_eval.__version__,
        "limit": cfg.limit,
        "num_fewshot": cfg.num_fewshot,
    }
    if cfg.log_samples:  # per task, one JSON-able dict per scored item; the caller stores them beside the result
        summary["samples"] = {task: rows for task, rows in results.get("samples", {}).items() if task in tasks}
    return summary
