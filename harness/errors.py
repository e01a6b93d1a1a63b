"""Errors a user can cause. The CLI prints these as one line and exits non-zero.

Anything else escaping the CLI is a bug in ptqbench and keeps its traceback.
"""
from __future__ import annotations


class PtqbenchError(Exception):
    """Base class for errors caused by user input or the environment."""


class ConfigError(PtqbenchError, ValueError):
    """A config field has a value that is not allowed. The message names field and allowed values."""


class UnknownNameError(PtqbenchError, KeyError):
    """A name (method, model, dataset) that no registry knows."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


class ResourceUnavailableError(PtqbenchError):
    """A model or data set that cannot be reached (no hub, missing path, missing tool)."""


class StorageError(PtqbenchError):
    """Writing results or a report failed (read-only folder, disk full); the message says what and where."""


class NonFiniteMetricError(PtqbenchError):
    """A run measured NaN or inf: a failure, never a result."""


class TrainingDivergedError(PtqbenchError):
    """An optimisation produced a NaN or inf loss."""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean X?)' hint for a misspelled name, or ''."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
