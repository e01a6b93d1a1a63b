"""The sweep config: models x methods x bit specs, plus calibration and evaluation settings.

A sweep is YAML (``yaml.safe_load``); every section is a frozen dataclass built by
``harness.schema`` so unknown keys and wrong types fail with the field's dotted path. The whole
config, including each method's options and every dataset name, is validated before any work.
Precedence: CLI flags > YAML > these defaults.

    name: demo
    seed: 0                 # or seeds: [0, 1, 2]: every run once per seed (reports show mean ± std)
    models: [smollm2-135m]
    methods: [rtn, {name: smoothquant, alpha: 0.5}]
    bits: [W8A8, W4A4]
    calibration: {dataset: brown, samples: 32, seqlen: 512}
    evaluation: {ppl: {datasets: [brown], seqlen: 512, max_windows: 40},
                 zeroshot: {tasks: [brown_nextsent, brown_cloze], limit: 100}}
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from harness import schema
from harness.bits import FP, BitSpec
from harness.data.windows import check_dataset_name
from harness.errors import ConfigError, PtqbenchError
from harness.data.config import CalibrationConfig
from harness.evaluation.config import EvaluationConfig
from harness.evaluation.zeroshot import check_tasks
from harness.method import Method, MethodConfig, pretrained_config
from harness.models import check_model_name, model_config
from harness.registry import get_method
from harness.scheme import QuantSchemeConfig
from harness.run.executor_config import ExecutorConfig, check_resources
from harness.run.preflight import check_model

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float16", "bfloat16", "float32")
# transformers' attn_implementation: "eager" is the explicit matmul + softmax the official QLLM /
# OmniQuant / SmoothQuant layers compute with; "sdpa" (the default) rounds differently.
ATTENTION_KERNELS = ("sdpa", "eager")


@dataclass(frozen=True)
class MethodEntry:
    """One method of the sweep: its registered name, its parsed options, and optionally its own bit specs,
    its own ``keep_quantized`` (None: the sweep's) and its own quant scheme (None: the sweep's; set where
    the method's ``quant_defaults`` or the entry's ``quant:`` change it, and then ``bits`` is set too)."""

    name: str
    config: MethodConfig
    bits: tuple[BitSpec, ...] | None = None
    keep_quantized: bool | None = None
    quant: QuantSchemeConfig | None = None

    @property
    def method_class(self) -> type[Method]:
        return get_method(self.name)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: ``{name: ..., <every option>, bits: [...]}`` (options made explicit)."""
        return {"name": self.name, **self.config.to_dict(), **({"bits": [b.name for b in self.bits]} if self.bits else {}),
                **({"keep_quantized": self.keep_quantized} if self.keep_quantized is not None else {}),
                **({"quant": schema.to_dict(self.quant)} if self.quant is not None else {})}


@dataclass(frozen=True)
class Override:
    """Method options for some models and bit specs (the official scripts differ per model and bits).

    ``models`` / ``bits`` empty = every model / bit spec of the sweep. ``methods`` maps a method
    name of the sweep to the options that replace its own for the matching runs; later overrides
    win over earlier ones. Parsed and checked by ``parse_config``; applied by ``execute.plan``.
    """

    models: tuple[str, ...] = ()
    bits: tuple[BitSpec, ...] = ()
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    def matches(self, model: str, bits: BitSpec) -> bool:
        return (not self.models or model in self.models) and (not self.bits or bits.name in {b.name for b in self.bits})

    def to_dict(self) -> dict[str, Any]:
        return {"models": list(self.models), "bits": [b.name for b in self.bits], "methods": self.methods}


@dataclass(frozen=True)
class SweepConfig:
    """Args (the sections have their own docstrings):
    seed: the seed of a one-seed sweep (calibration windows, the method's randomness).
    seeds: several seeds, each a full set of runs (calibration draw and method randomness per seed);
        empty = just ``seed``. ``seeds: [0]`` is the same sweep (same run keys) as ``seed: 0``.
    attention_kernel: "sdpa" (default) or "eager", the attention kernel every run's model computes
        with (FP and quantized, calibration and evaluation). "eager" reproduces the official codes'
        numerics; it is slower and uses more memory at long sequences.
    threads: the torch threads every run computes with on the CPU (null = torch's default, the machine's
        cores); recorded in each result's provenance. Results do not depend on it (docs/fidelity.md#reproducibility):
        it pins speed and the load a sweep puts on a shared machine.
    """

    name: str = "sweep"
    seed: int = 0
    seeds: tuple[int, ...] = ()
    device: str = "auto"
    dtype: str = "auto"
    attention_kernel: str = "sdpa"
    threads: int | None = None
    trust_remote_code: bool = False
    keep_work: bool = False  # keep each run's work directory (<out>/work/<key>: finished blocks) after it finished
    keep_quantized: bool = False  # keep each quantized run's model in <out>/quantized/<key>/ (export format)
    models: tuple[str, ...] = ()
    methods: tuple[MethodEntry, ...] = ()  # parsed by parse_config, not by the schema
    bits: tuple[BitSpec, ...] = ()
    quant: QuantSchemeConfig = field(default_factory=QuantSchemeConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    overrides: tuple[Override, ...] = ()  # parsed by parse_config, not by the schema
    export: bool = False  # also write every quantized run's model to <out>/export/<key>/ (harness.run.export_run)

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.device not in DEVICES:
            raise ConfigError(f"device: {self.device!r} is not allowed; use one of {DEVICES}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not allowed; use one of {DTYPES}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError(f"attention_kernel: {self.attention_kernel!r} is not allowed; use one of {ATTENTION_KERNELS}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads: {self.threads!r} is not allowed; use an integer >= 1, or leave it out for torch's default")
        if not self.models:
            raise ConfigError("models: empty; list at least one model (zoo name, HF id or local folder)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: {list(self.seeds)} repeats a seed; list each seed once")

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The seeds every run is repeated over: ``seeds``, or the single ``seed``."""
        return self.seeds or (self.seed,)

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML would write it: ``parse_config(config.to_dict()) == config``."""
        data = schema.to_dict(self)
        data["methods"] = [m.to_dict() for m in self.methods]
        data["bits"] = [b.name for b in self.bits]
        data["overrides"] = [o.to_dict() for o in self.overrides]
        return data

    def method_config(self, entry: MethodEntry, model: str, bits: BitSpec) -> MethodConfig:
        """``entry``'s options for one run: its own, then every matching override in order."""
        options = [o.methods[entry.name] for o in self.overrides if entry.name in o.methods and o.matches(model, bits)]
        if not options:
            return entry.config
        merged = entry.config.to_dict()
        for extra in options:
            merged.update(extra)
        return entry.method_class.config_class.from_dict(merged, f"methods.{entry.name}")


def check_name(name: str) -> None:
    """A sweep name becomes a folder name (runs/<name>): one plain path component, never a way out of runs/."""
    if not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\0")) or name.startswith("."):
        raise ConfigError(f"name: {name!r} is not allowed; use a plain name without path separators or a leading dot, e.g. demo")


def _bit_specs(raw: Any, quant: QuantSchemeConfig, where: str) -> tuple[BitSpec, ...]:
    specs = []
    for i, text in enumerate(raw if isinstance(raw, (list, tuple)) else [raw]):
        try:
            specs.append(quant.bit_spec(str(text)))
        except ConfigError as err:  # BitSpec names its field "bits"; say which list and item
            raise ConfigError(f"{where}[{i}]{str(err).removeprefix('bits')}") from None
    return tuple(specs)


def _method_entry(item: Any, quant: QuantSchemeConfig, explicit: Iterable[str], sweep_bits: Any, where: str) -> MethodEntry:
    """A ``methods:`` item, a name or ``{name: ..., bits: [...], quant: {...}, <options>}``, parsed into its typed config.

    With a quant scheme of its own (``Method.quant_defaults`` or ``quant:``) the entry's bit specs are its
    own list or the sweep's ``bits``, parsed with that scheme.
    """
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ConfigError(f"{where}: expected a method name or a mapping with a 'name' key")
    method_cls = _get(lambda: get_method(item["name"]), f"{where}.name")
    options = {k: v for k, v in item.items() if k not in ("name", "bits", "keep_quantized", "quant")}
    config = method_cls.config_class.from_dict(options, where)
    own = quant.for_method(method_cls, explicit, item.get("quant"), f"{where}.quant")
    own = None if own == quant else own
    raw_bits = item.get("bits") if item.get("bits") is not None else sweep_bits if own is not None and sweep_bits else None
    bits = _bit_specs(raw_bits, own or quant, f"{where}.bits") if raw_bits is not None else None
    keep = item.get("keep_quantized")
    if keep is not None and not isinstance(keep, bool):
        raise ConfigError(f"{where}.keep_quantized: {keep!r} is not allowed; use true or false")
    return MethodEntry(item["name"], config, bits, keep, own)


def _sweep_bits(config: SweepConfig) -> set[str]:
    """The names of every bit spec the sweep's methods run (its own list and the methods' own)."""
    return {b.name for b in config.bits} | {b.name for m in config.methods for b in m.bits or ()}


def _overrides(raw: Any, config: SweepConfig) -> tuple[Override, ...]:
    """The ``overrides:`` list: every model, bit spec, method and option must be one the sweep has."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("overrides: expected a list of {models: [...], bits: [...], methods: {name: {option: value}}}")
    sweep_bits = _sweep_bits(config)
    result = []
    for i, item in enumerate(raw):
        where = f"overrides[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with models, bits and methods")
        unknown = set(item) - {"models", "bits", "methods"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key; allowed: models, bits, methods")
        models = schema._coerce(item.get("models") or [], tuple[str, ...], f"{where}.models")
        for j, model in enumerate(models):
            if model not in config.models:
                raise ConfigError(f"{where}.models[{j}]: {model!r} is not a model of this sweep; use one of {list(config.models)}")
        bits = _bit_specs(item["bits"], config.quant, f"{where}.bits") if item.get("bits") else ()
        for j, spec in enumerate(bits):
            if spec.name not in sweep_bits:
                raise ConfigError(f"{where}.bits[{j}]: {spec.name} is not a bit spec of this sweep; use one of {sorted(sweep_bits)}")
        methods = item.get("methods")
        if not isinstance(methods, dict) or not methods:
            raise ConfigError(f"{where}.methods: expected a mapping {{method name: {{option: value}}}}")
        entries = {m.name: m for m in config.methods}
        for name, options in methods.items():
            if name not in entries:
                raise ConfigError(f"{where}.methods.{name}: not a method of this sweep; use one of {list(entries)}")
            if not isinstance(options, dict):
                raise ConfigError(f"{where}.methods.{name}: expected a mapping of options")
            # checked against the method's own config now, so a typo fails before any work
            entries[name].method_class.config_class.from_dict({**entries[name].config.to_dict(), **options}, f"{where}.methods.{name}")
        result.append(Override(models, bits, {k: dict(v) for k, v in methods.items()}))
    return tuple(result)


def parse_config(raw: Any, source: str = "config") -> SweepConfig:
    """Validate a loaded YAML mapping completely; every error is a ``ConfigError`` naming its field.

    This is the one place YAML becomes typed objects: method options become each method's
    ``MethodConfig``, bit specs ``BitSpec``s; nothing downstream parses them again.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level")
    data = dict(raw)
    methods, bits, overrides = data.pop("methods", None), data.pop("bits", None), data.pop("overrides", None)
    config = schema.from_dict(SweepConfig, data)
    if not isinstance(methods, list) or not methods:
        raise ConfigError("methods: expected a non-empty list of method names or {name: ..., <options>} mappings")
    explicit = set(data.get("quant") or {}) if isinstance(data.get("quant"), dict) else set()
    entries = tuple(_method_entry(item, config.quant, explicit, bits, f"methods[{i}]") for i, item in enumerate(methods))
    specs = _bit_specs(bits, config.quant, "bits") if bits else ()
    if not specs and not all(m.bits for m in entries):
        raise ConfigError("bits: empty; list bit specs such as [W8A8, W4A4] (or give every method its own bits)")
    config = replace(config, methods=entries, bits=specs)
    config = replace(config, overrides=_overrides(overrides, config))
    executor = check_resources(config.executor, config.models, _sweep_bits(config) | {FP.name},
                               lambda texts, where: tuple(s.name for s in _bit_specs(texts, config.quant, where)))
    config = replace(config, executor=executor)
    for i, name in enumerate(config.models):
        _get(lambda n=name: check_model_name(n), f"models[{i}]")
    for name in (config.calibration.dataset,):
        _get(lambda n=name: check_dataset_name(n), "calibration.dataset")
    for i, name in enumerate(config.evaluation.ppl.datasets):
        _get(lambda n=name: check_dataset_name(n), f"evaluation.ppl.datasets[{i}]")
    check_tasks(config.evaluation.zeroshot)
    _check_against_models(config)
    _check_methods_against_bits(config)
    return config


def _check_methods_against_bits(config: SweepConfig) -> None:
    """Each method entry's options against each bit spec it runs (``Method.check``) and each model whose
    config.json is here (``Method.check_model``), overrides applied."""
    configs = {model: model_config(model) for model in config.models}
    for i, entry in enumerate(config.methods):
        for spec in entry.bits or config.bits:
            for model in config.models:
                method = entry.method_class(config.method_config(entry, model, spec))
                _get(lambda m=method, s=spec: m.check(s), f"methods[{i}] at {spec.name}")
                if configs[model] is not None:
                    _get(lambda m=method, c=configs[model]: m.check_model(pretrained_config(c)), f"methods[{i}] on {model}")


def _check_against_models(config: SweepConfig) -> None:
    """Each model's config.json against the bit specs and window lengths it will see (``harness.run.preflight``)."""
    specs = [(f"bits[{i}]", s) for i, s in enumerate(config.bits)]
    specs += [(f"methods[{j}].bits[{i}]", s) for j, m in enumerate(config.methods) for i, s in enumerate(m.bits or ())]
    seqlens = [("evaluation.ppl.seqlen", config.evaluation.ppl.seqlen)] if config.evaluation.ppl.datasets else []
    if any(m.method_class.needs_calibration for m in config.methods):
        seqlens.append(("calibration.seqlen", config.calibration.seqlen))
    for i, name in enumerate(config.models):
        try:
            check_model(name, f"models[{i}]", specs, seqlens)
        except ConfigError:
            raise  # already names its field (bits[0], evaluation.ppl.seqlen, ...)
        except PtqbenchError as err:
            raise ConfigError(f"models[{i}]: {err}") from None


def with_task_data(config: SweepConfig, task_data: str) -> SweepConfig:
    """``config`` reading its zero-shot tasks from ``task_data`` (``ptqbench run --task-data``), checked."""
    zs = replace(config.evaluation.zeroshot, task_data=task_data)
    check_tasks(zs)
    return replace(config, evaluation=replace(config.evaluation, zeroshot=zs))


def _get(thunk: Any, where: str) -> Any:
    try:
        return thunk()
    except PtqbenchError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config: {path} cannot be read as text ({err.__class__.__name__})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML ({yaml_problem(err, text)})") from None
    return parse_config(raw, source=str(path))


def yaml_problem(err: yaml.YAMLError, text: str) -> str:
    """Where and what: ``line 3, column 1: found character '\\t' ...; tabs are not allowed ...``."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is None:
        return problem
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    # PyYAML words a tab problem many ways (or blames the next line); say it plainly.
    hint = "; tabs are not allowed in YAML, indent with spaces" if "\t" in line or "\\t" in problem else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}{hint}"
