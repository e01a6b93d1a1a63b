"""The evaluation section of a sweep (``evaluation:`` in YAML): perplexity windows and zero-shot tasks."""
from __future__ import annotations

from dataclasses import dataclass, field

from harness.errors import ConfigError
from harness.evaluation.zeroshot import ZeroShotConfig


@dataclass(frozen=True)
class PerplexityConfig:
    """Args:
    datasets: corpora to score (brown, wikitext2, c4, or text file paths).
    seqlen: window length (the papers: 2048).
    max_windows: score only the first N windows (null = all); recorded with every result.
    batch_size: windows per forward pass.
    """

    datasets: tuple[str, ...] = ("brown",)
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.seqlen < 2:
            raise ConfigError(f"seqlen: {self.seqlen} is not allowed; use an integer >= 2")
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"max_windows: {self.max_windows} is not allowed; use a positive integer or null")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: {self.batch_size} is not allowed; use a positive integer")


@dataclass(frozen=True)
class EvaluationConfig:
    ppl: PerplexityConfig = field(default_factory=PerplexityConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)

    def __post_init__(self) -> None:
        if not self.ppl.datasets and not self.zeroshot.tasks:
            raise ConfigError("evaluation: measures nothing (ppl.datasets and zeroshot.tasks are both empty); "
                              "list a perplexity dataset or a zero-shot task")
