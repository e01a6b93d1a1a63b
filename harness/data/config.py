"""The calibration section of a sweep: which text, how many windows, how long (``calibration:`` in YAML)."""
from __future__ import annotations

from dataclasses import dataclass

from harness.errors import ConfigError


@dataclass(frozen=True)
class CalibrationConfig:
    """Args:
    dataset: corpus name (brown, wikitext2, c4) or a text file path.
    samples: number of random windows (the papers: 128).
    seqlen: tokens per window (the papers: 2048).
    """

    dataset: str = "brown"
    samples: int = 128
    seqlen: int = 2048

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"samples: {self.samples} is not allowed; use a positive integer")
        if self.seqlen < 2:
            raise ConfigError(f"seqlen: {self.seqlen} is not allowed; use an integer >= 2")
