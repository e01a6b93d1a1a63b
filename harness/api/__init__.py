"""ptqbench's Python API, importable as ``ptqbench`` (pyproject maps this folder to that name).

A thin layer over ``harness`` for notebooks and scripts; the command line does the same work::

    import ptqbench
    loaded = ptqbench.load_model("smollm2-135m")                            # zoo name, HF folder or hub id (or your own)
    model = ptqbench.quantize(loaded.model, "rtn", "W4A16")                 # an in-memory HF model
    model = ptqbench.quantize(model, "smoothquant", "W8A8", "brown", tokenizer=tok, alpha=0.5,
                              quant={"act_symmetric": True})                # a sweep's quant: section
    ppl = ptqbench.perplexity(model, tok, "brown", seqlen=512, max_windows=16)  # a sweep's ppl, same windows
    ptqbench.export(model, "out/w8a8", tokenizer=tok)                       # compressed-tensors or ptqbench format
    model = ptqbench.load_quantized("out/w8a8")
    summary = ptqbench.run("configs/demo.yaml", "runs/demo")                # a sweep, like `ptqbench run`
    frame = ptqbench.load_results("runs/demo")                              # pandas, one row per run

``quantize`` builds its bit spec exactly as a sweep does (``harness.scheme.effective_spec``: the
sweep's ``quant:`` defaults, the method's ``quant_defaults``, ``attention: auto``), checks it and the
model as a sweep does (``Method.apply``), and seeds as a sweep does: the same model, method, options,
bits, ``quant``, seed and calibration windows give the same weights as a one-run sweep, and
``perplexity`` / ``zeroshot`` score them as its ``evaluation:`` section does.

Methods are ``ptqbench.Method`` subclasses registered with ``ptqbench.register_method`` (or the
``ptqbench.methods`` entry point). Why a mapped folder rather than a top-level package: the
repository's layout stays harness/, methods/, ... and ``harness`` remains the one implementation;
``ptqbench`` only re-exports and adapts arguments.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.bits import BitSpec
from harness.errors import ConfigError, PtqbenchError
from harness.export.formats import ExportResult
from harness.export.loader import load_quantized
from harness.export.writer import export_model
from harness.method import Method, MethodConfig, QuantContext
from harness.models import LoadedModel, load_model
from harness.registry import get_method, register_method
from harness.scheme import effective_spec


def _version() -> str:
    try:
        return metadata.version("ptqbench")
    except metadata.PackageNotFoundError:  # a checkout on the path, not installed
        import harness

        return harness.__version__


__version__ = _version()


def _calibration(calibration: torch.Tensor | str | None, tokenizer: Any, samples: int, seqlen: int, seed: int) -> torch.Tensor | None:
    if calibration is None or isinstance(calibration, torch.Tensor):
        return calibration
    if tokenizer is None:
        raise ConfigError(f"calibration: {calibration!r} is a dataset name; pass tokenizer= to tokenize it (or pass token ids)")
    from harness.data.windows import calibration_windows, check_dataset_name

    check_dataset_name(calibration)
    return calibration_windows(calibration, tokenizer, samples, seqlen, seed)


def quantize(model: nn.Module, method: str | Method, bits: str | BitSpec, calibration: torch.Tensor | str | None = None, *,
             tokenizer: Any = None, samples: int = 128, seqlen: int = 2048, seed: int = 0, device: str = "auto",
             quant: dict[str, Any] | None = None, progress: bool = True, **options: Any) -> nn.Module:
    """Quantize an in-memory Hugging Face model with a registered method, as a sweep would; returns the quantized model.

    ``method``: a registered name (``rtn``, ``smoothquant``, ``gptq``, ``quarot``, plugins) with its
    ``options`` as keywords, or a ``Method`` instance. ``bits``: ``"W4A16"``, ``"W4A4KV4"``, ``"W4A4g128"``,
    built with the sweep's scheme; or a ``BitSpec``, used exactly as given. ``quant``: the settings of a
    sweep's ``quant:`` section (``act_symmetric``, ``attention``, ``act_clip_ratio``, ...; docs/config.md),
    which win over the method's ``quant_defaults``. ``calibration``: (samples, seqlen) token ids, or a
    dataset name (``brown``, ``wikitext2``, ``c4``, a text file) tokenized with ``tokenizer`` into
    ``samples`` random windows of ``seqlen`` tokens drawn with ``seed``, the sweep's windows.
    The model is changed in place where the method can (its linears become ``QuantLinear``s).
    """
    from harness.models import resolve_device

    if isinstance(method, Method):
        if options:
            raise ConfigError("options: pass options by name only with a method name, not with a Method instance")
        instance = method
    else:
        instance = get_method(method).from_options(options, f"methods.{method}")
    spec = effective_spec(instance, bits, quant)
    tokens = _calibration(calibration, tokenizer, samples, seqlen, seed)
    torch.manual_seed(seed)  # as the sweep's execute, right before the method
    result = instance.apply(model, spec, tokens, QuantContext(device=resolve_device(device), seed=seed, progress=progress))
    return result.model


def perplexity(model: nn.Module, tokenizer: Any, dataset: str = "brown", *, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, device: str = "auto", progress: bool = True) -> float:
    """Perplexity of ``model`` on ``dataset``'s test text, as a sweep's ``evaluation.ppl`` computes ``ppl_<dataset>``:
    the same windows (the first ``max_windows`` of ``seqlen`` tokens; docs/data.md) and the same block-wise pass."""
    from harness.evaluation.config import EvaluationConfig, PerplexityConfig

    evaluation = EvaluationConfig(ppl=PerplexityConfig(datasets=(dataset,), seqlen=seqlen, max_windows=max_windows,
                                                       batch_size=batch_size))
    return _evaluate(model, tokenizer, evaluation, device, progress)["ppl"][dataset]


def zeroshot(model: nn.Module, tokenizer: Any, tasks: list[str] | tuple[str, ...], *, limit: int | None = None,
             batch_size: int = 8, num_fewshot: int = 0, task_data: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on lm-eval ``tasks`` (``piqa``, ..., or the offline ``brown_nextsent``,
    ``brown_cloze``), as a sweep's ``evaluation.zeroshot``: per task acc/acc_norm, versions and the average."""
    from harness.evaluation.config import EvaluationConfig, PerplexityConfig
    from harness.evaluation.zeroshot import ZeroShotConfig, check_tasks

    cfg = ZeroShotConfig(tasks=tuple(tasks), limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, task_data=task_data)
    check_tasks(cfg)
    evaluation = EvaluationConfig(ppl=PerplexityConfig(datasets=()), zeroshot=cfg)
    return _evaluate(model, tokenizer, evaluation, device, False)["zeroshot"]


def _evaluate(model: nn.Module, tokenizer: Any, evaluation: Any, device: str, progress: bool) -> dict[str, Any]:
    from harness.evaluation.evaluate import evaluate_model
    from harness.models import resolve_device

    dev = resolve_device(device)
    return evaluate_model(model, tokenizer, evaluation, device=dev, progress=progress)


def export(model: nn.Module, out: str | Path, *, tokenizer: Any = None, overwrite: bool = False) -> ExportResult:
    """Write a quantized model as a Hugging Face folder (see ``harness.export.formats``); returns path, format and size."""
    return export_model(model, tokenizer, out, overwrite=overwrite)


def run(config: str | Path | dict | Any, out: str | Path, *, force: bool = False, progress: bool = True) -> Any:
    """Run a sweep (a YAML path, a mapping as YAML would give, or a parsed ``SweepConfig``); returns its summary."""
    from harness.run.config import SweepConfig, load_config, parse_config
    from harness.run.sweep import run_sweep

    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = parse_config(config)
    elif not isinstance(config, SweepConfig):
        raise ConfigError(f"config: expected a YAML path, a mapping or a SweepConfig, got {type(config).__name__}")
    return run_sweep(config, out, force=force, progress=progress)


def load_results(results_dir: str | Path, aggregate: bool = False) -> Any:
    """The runs stored in a results directory as a pandas DataFrame: the tidy frame, one row per run
    (the same columns as ``ptqbench report --format csv``); ``aggregate=True``: mean, std and n over seeds."""
    from harness.report import frame

    runs = frame.load_frame(results_dir)
    return frame.aggregate(runs) if aggregate else runs


__all__ = ["BitSpec", "ConfigError", "ExportResult", "LoadedModel", "Method", "MethodConfig", "PtqbenchError", "QuantContext",
           "__version__", "effective_spec", "export", "load_model", "load_quantized", "load_results", "perplexity", "quantize",
           "register_method", "run", "zeroshot"]
