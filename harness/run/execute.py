"""One run of a sweep: what decides it (``RunSpec``), how a sweep expands into runs (``plan``), and
how a run executes (``execute``: model -> calibration -> method -> evaluation -> ``RunRecord``).

``execute`` is a pure function of its ``RunSpec`` (it loads its own model and data), so an executor
can ship it to a Ray worker or a Slurm job; the sweep driver (``harness.run.sweep``) stores what comes back.
A run whose metrics include NaN or inf raises ``NonFiniteMetricError``: a failure, never a result.
Local inputs (data files, model folders) are fingerprinted once when the sweep is planned
(``harness.fingerprint``) and their prints are part of the run key, so a changed file is a new run.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness import schema
from harness.bits import FP, BitSpec
from harness.data import brown
from harness.data.windows import CORPORA, calibration_windows
from harness.models.lazy import block_store
from harness.engine.memory import check_fits
from harness.errors import NonFiniteMetricError
from harness.evaluation.evaluate import evaluate_model
from harness.method import Method, MethodConfig, QuantContext
from harness.models import ZOO, load_model, resolve_device, resolve_dtype
from harness.paths import cache_home
from harness.registry import REGISTRY, get_method
from harness.run.config import SweepConfig
from harness.data.config import CalibrationConfig
from harness.evaluation.config import EvaluationConfig
from harness.run.costs import CostMeter
from harness.fingerprint import fingerprint, hub_commit
from harness.runtime import kill_point, torch_threads
from harness.run.record import RunRecord
from harness.run.results import run_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides one run's result, parsed and typed."""

    model: str
    method: str
    config: MethodConfig  # the method's options
    bits: BitSpec
    calibration: CalibrationConfig | None  # None for methods that use no data
    evaluation: EvaluationConfig
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    attention_kernel: str = "sdpa"  # transformers' attn_implementation (harness.run.config.ATTENTION_KERNELS)
    threads: int | None = None  # torch CPU threads (None: torch's default); not part of the key: results do not depend on it
    trust_remote_code: bool = False
    inputs: tuple[tuple[str, str], ...] = ()  # (local file or folder, fingerprint), from local_inputs()
    # Where the run keeps its finished blocks while it runs (``<out>/work``; not part of the key).
    work_root: str | None = None
    keep_work: bool = False  # keep <work_root>/<key> after the run's result is stored (else the driver deletes it)
    keep_quantized: bool = False  # write the quantized model to <quantized_root>/<key> in the export format
    quantized_root: str | None = None  # ``<out>/quantized`` (set by the sweep; not part of the key)
    log_file: str | None = None  # where the worker appends the run's log (harness.run.runlog; not part of the key)

    @property
    def method_class(self) -> type[Method]:
        return get_method(self.method)

    def identity(self) -> dict[str, Any]:
        """What the run key hashes: every field that can change the result (not ``trust_remote_code``)."""
        ident = {
            "model": self.model, "method": self.method, "options": self.config.to_dict(), "bits": self.bits.to_dict(),
            "calibration": schema.to_dict(self.calibration), "evaluation": schema.to_dict(self.evaluation),
            "seed": self.seed, "dtype": self.dtype,
            "device": resolve_device(self.device).type,  # "auto" on a GPU box and "cuda" are the same run
        }
        if not self.evaluation.zeroshot.tasks:  # runs without zero-shot keep the keys they had before it existed
            ident["evaluation"].pop("zeroshot")
        else:  # logging lm-eval's samples changes no number
            ident["evaluation"]["zeroshot"].pop("log_samples")
        if self.attention_kernel != "sdpa":  # runs on the default kernel keep the keys they had before the option
            ident["attention_kernel"] = self.attention_kernel
        if self.inputs:  # only runs reading local files: zoo models and named corpora keep their keys
            ident["inputs"] = dict(self.inputs)
        return ident

    @property
    def key(self) -> str:
        return run_key(self.identity())

    @property
    def label(self) -> str:
        return f"{self.model} {self.method} {self.bits.name}"

    @property
    def slug(self) -> str:
        """The label as one file- and job-name-safe word: ``llama-2-7b-rtn-W4A4-s0`` (a hub id or folder: its last part)."""
        text = f"{Path(self.model.rstrip('/')).name}-{self.method}-{self.bits.name}-s{self.seed}"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def _baseline(config: SweepConfig) -> tuple[str, MethodConfig]:
    """The sweep's reference method: the first baseline it lists (a plugin's, say), else the registry's default."""
    for entry in config.methods:
        if entry.method_class.is_baseline:
            return entry.name, entry.config
    cls = REGISTRY.default_baseline()
    return cls.name, cls.config_class()


def local_inputs(model: str, calibration: CalibrationConfig | None, evaluation: EvaluationConfig) -> tuple[tuple[str, str], ...]:
    """(path, fingerprint) of each local file or folder a run reads (cached: each is hashed once per sweep)."""
    names = [model, *([calibration.dataset] if calibration else []), *evaluation.ppl.datasets]
    named = (n for n in dict.fromkeys(names) if n not in ZOO and n not in CORPORA)  # names win over same-named paths
    prints = {n: fp for n in named if (fp := fingerprint(n)) is not None}
    return tuple(sorted(prints.items()))


def plan(config: SweepConfig) -> list[RunSpec]:
    """Every run of the sweep: per seed and model the baseline once (at W16A16), then each method at each of its bit specs.

    A run's options are its method entry's, with the sweep's matching ``overrides`` applied, so
    the key and the recorded options carry them. A method the seed cannot change
    (``Method.seed_independent``: FP, RTN) runs at the first seed only; its record stands for every seed.
    """
    runs: list[RunSpec] = []
    baseline, baseline_config = _baseline(config)
    for seed in config.run_seeds:  # seed-major: an interrupted sweep has whole seeds, not a ragged mix
        first = seed == config.run_seeds[0]
        common = dict(evaluation=config.evaluation, seed=seed, device=config.device, dtype=config.dtype,
                      attention_kernel=config.attention_kernel, threads=config.threads, trust_remote_code=config.trust_remote_code,
                      keep_work=config.keep_work)
        for model in config.models:
            inputs = local_inputs(model, None, config.evaluation)
            if first or not get_method(baseline).seed_independent():
                runs.append(RunSpec(model, baseline, baseline_config, FP, None, **common, inputs=inputs))
            for entry in config.methods:
                cls = entry.method_class
                if cls.is_baseline or (cls.seed_independent() and not first):
                    continue
                calibration = config.calibration if cls.needs_calibration else None
                inputs = local_inputs(model, calibration, config.evaluation)
                keep = config.keep_quantized if entry.keep_quantized is None else entry.keep_quantized
                for spec in entry.bits or config.bits:
                    options = config.method_config(entry, model, spec)  # the sweep's per-model/bits overrides
                    runs.append(RunSpec(model, entry.name, options, spec, calibration, **common, inputs=inputs,
                                        keep_quantized=keep))
    unique = {r.key: r for r in runs}  # a method listed twice with the same options runs once
    return list(unique.values())


def work_dir(run: RunSpec) -> Path:
    """The run's work directory: ``<work_root>/<key>``, or one under the cache for runs outside a sweep."""
    return Path(run.work_root) / run.key if run.work_root else cache_home() / "work" / run.key


def quantized_dir(run: RunSpec) -> Path:
    """Where ``keep_quantized`` keeps the run's model: ``<quantized_root>/<key>``, or under the cache outside a sweep."""
    return Path(run.quantized_root) / run.key if run.quantized_root else cache_home() / "quantized" / run.key


def execute(run: RunSpec, progress: bool = True) -> RunRecord:
    """:func:`_execute` with the run's torch thread count (``threads``), the process's own restored after."""
    with torch_threads(run.threads):
        return _execute(run, progress)


def _execute(run: RunSpec, progress: bool = True) -> RunRecord:
    """Run one quantize-and-evaluate job and return its record (token streams are cached by ``harness.data.windows``).

    Models with a safetensors folder load lazily (``harness.models.lazy``): each decoder block is read when
    the method reaches it and its finished version is written to the run's work directory, which
    stays: the caller removes it once the returned record is stored (``harness.run.workdir.discard``;
    the sweep driver does, unless ``keep_work``), so a kill at any point before then resumes from
    it. Perplexity goes block by block, so neither the host nor the device ever holds the whole
    model. With ``keep_quantized`` the quantized model is also written to ``quantized_dir(run)`` in
    the export format (whole in host memory while it is written, as ``ptqbench export`` holds it).
    """
    device = resolve_device(run.device)
    cls = run.method_class
    method = cls(run.config)
    started = dt.datetime.now(dt.timezone.utc)
    torch.manual_seed(run.seed)
    work = work_dir(run)
    estimate = check_fits(run)  # refuse now, not after hours, when the machine cannot hold the run
    if estimate is not None:
        log.info("%s: estimated peak %s", run.label, estimate.describe())
    with CostMeter(device) as meter:
        with meter.phase("load"):
            loaded = load_model(run.model, dtype=run.dtype, device=run.device, seed=run.seed,
                                trust_remote_code=run.trust_remote_code, lazy=True, attention_kernel=run.attention_kernel)
            store = block_store(loaded.model)
            if store is not None:
                # a killed attempt of this same run (same key) left its checkpoint here: the engine continues from it
                store.set_work_dir(work / "blocks", key=run.key)
        calib = None
        if run.calibration is not None:
            c = run.calibration
            with meter.phase("calibrate"):
                calib = calibration_windows(c.dataset, loaded.tokenizer, c.samples, c.seqlen, run.seed)
        with meter.phase("quantize"):
            torch.manual_seed(run.seed)  # the method's randomness starts from the seed, whatever loading drew (as the API)
            result = method.apply(loaded.model, run.bits, calib, QuantContext(device=device, seed=run.seed, progress=progress))
        model = result.model
        if store is not None:
            size = sum(f.stat().st_size for f in store.work.glob("*.safetensors"))
            log.info("%s: %d finished blocks in %s (%.1f MB)", run.label, len(store.finished), store.work, size / 2**20)
        with meter.phase("evaluate"):
            metrics = evaluate_model(model, loaded.tokenizer, run.evaluation, device=device, label=run.label, progress=progress)
        samples = metrics.get("zeroshot", {}).pop("samples", {})
    check_finite(metrics)
    if run.keep_quantized:
        keep_model(run, model, loaded.tokenizer)
    kill_point("eval:done")
    return RunRecord(
        key=run.key, model=run.model, model_source=loaded.source, method=run.method, baseline=cls.is_baseline,
        options=run.config.to_dict(), bits=run.bits.name, bit_spec=run.bits.to_dict(),
        calibration=schema.to_dict(run.calibration), evaluation=schema.to_dict(run.evaluation), seed=run.seed,
        metrics=metrics, stats=result.stats, cost=meter.summary(),
        started_at=started.isoformat(), finished_at=dt.datetime.now(dt.timezone.utc).isoformat(), samples=samples,
        provenance=_inputs_provenance(run, device),
    )


def keep_model(run: RunSpec, model: torch.nn.Module, tokenizer: Any) -> None:
    """``keep_quantized``: the run's model in the export format at ``quantized_dir(run)`` (replaced whole if there)."""
    from harness.models.lazy import materialize_all
    from harness.export.writer import export_model

    if run.method_class.is_baseline:
        return
    target = quantized_dir(run)
    result = export_model(materialize_all(model).cpu(), tokenizer, target, overwrite=True,
                          source={"key": run.key, "model": run.model, "method": run.method, "bits": run.bits.name,
                                  "seed": run.seed})
    log.info("%s: quantized model kept in %s (%s, %d bytes)", run.label, target, result.format, result.size_bytes)


def _inputs_provenance(run: RunSpec, device: torch.device) -> dict[str, Any]:
    """What the run read and computed with, beyond its key: input prints, the hub commit, the resolved dtype, the corpus
    package, the torch threads it ran on (``threads``, or the process's default)."""
    hub_id = ZOO[run.model].hub_id if run.model in ZOO else (None if run.model in dict(run.inputs) else run.model)
    datasets = {*run.evaluation.ppl.datasets, *([run.calibration.dataset] if run.calibration else [])}
    return {"inputs": dict(run.inputs), "model_commit": hub_commit(hub_id) if hub_id else None,
            "dtype": str(resolve_dtype(run.dtype, device)).removeprefix("torch."),
            "corpus_packages": {"brown": brown.NPM_PACKAGE} if "brown" in datasets else {},
            "seed_independent": run.method_class.seed_independent(), "torch_threads": torch.get_num_threads()}


def check_finite(metrics: dict[str, Any]) -> None:
    """Refuse NaN or inf in any perplexity or zero-shot accuracy (JSON cannot hold them; a report would hide them)."""
    found = [(f"ppl on dataset {name!r}", v) for name, v in metrics.get("ppl", {}).items()]
    zs = metrics.get("zeroshot") or {}
    found += [(f"{m} on task {task!r}", e[m]) for task, e in (zs.get("tasks") or {}).items() for m in ("acc", "acc_norm") if m in e]
    if zs.get("average") is not None:
        found.append(("zero-shot average", zs["average"]))
    for what, value in found:
        if not math.isfinite(value):
            raise NonFiniteMetricError(f"metric {what} is {value}: the model computes NaN or inf (check its weights and dtype); not stored as a result")
