"""The result of one run, as stored in ``runs/<key>.json`` and read back by reports.

One typed record instead of a dict literal: ``execute`` builds it, the store writes
``to_dict()``, and every reader gets it back through ``RunRecord.from_dict``, which checks the
schema version and that every field is present, so a truncated or foreign file is refused with
an error naming it instead of being half-read through ``.get`` calls.

    metrics = {"ppl": {"brown": 42.3}, "ppl_windows": {"brown": 40},
               "zeroshot": {"tasks": {"piqa": {"acc": 0.7, "metric": "acc", ...}}, "average": 0.7, ...}}
    cost = CostMeter.summary(): wall_s, phases_s, device, device_type, device_count, device_hours,
           quantize_device_hours, peak_memory_bytes, peak_memory_kind, ...
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from harness.bits import BitSpec
from harness.errors import PtqbenchError

# Bump when a field is added, removed or changes meaning; readers refuse other versions.
SCHEMA_VERSION = 2


class RecordError(PtqbenchError):
    """A stored result that cannot be trusted (unreadable, incomplete, another schema version)."""


@dataclass
class RunRecord:
    key: str
    model: str
    method: str
    options: dict[str, Any]  # the method's full config (defaults made explicit)
    bits: str  # the bit spec's short name, e.g. W4A4
    bit_spec: dict[str, Any]  # BitSpec.to_dict()
    calibration: dict[str, Any] | None  # None for methods that read no data
    evaluation: dict[str, Any]
    seed: int
    metrics: dict[str, Any]
    cost: dict[str, Any]
    started_at: str
    finished_at: str
    baseline: bool = False  # the method is the sweep's reference (Method.is_baseline), never a competitor
    model_source: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    schema_version: int = SCHEMA_VERSION
    # lm-eval's per-sample logs by task (``log_samples``); never in the JSON: the store writes
    # samples/<key>/<task>.jsonl beside it, so results stay small.
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> BitSpec:
        return BitSpec.from_dict(self.bit_spec)

    @property
    def ppl(self) -> dict[str, float]:
        return self.metrics.get("ppl", {})

    @property
    def zeroshot_tasks(self) -> dict[str, dict[str, Any]]:
        """Per task: acc / acc_norm (fractions), the compared ``metric``, version, ... (empty without zero-shot)."""
        return (self.metrics.get("zeroshot") or {}).get("tasks") or {}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("samples")
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "record") -> RunRecord:
        """Check and build a record; ``RecordError`` names ``where`` and what is wrong."""
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RecordError(f"{where}: schema_version {version!r}, this ptqbench reads {SCHEMA_VERSION}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise RecordError(f"{where}: incomplete result, missing {', '.join(missing)}")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise RecordError(f"{where}: unknown fields {', '.join(unknown)}")
        return cls(**data)
