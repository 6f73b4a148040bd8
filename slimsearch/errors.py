"""The project's exception types.

``ConfigError`` is for input the user can fix (a TOML key, a task name, a storage URL): the CLI
prints its message and exits with code 2 before any training starts. ``TrialError`` marks a
trial that failed for a reason worth recording (NaN loss, a recipe the model cannot take); the
search records it and goes on. ``TrialStopped`` ends a trial that cannot finish in time; it
is recorded PRUNED.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


class SlimsearchError(Exception):
    """Base class of every error slimsearch raises on purpose."""


class ConfigError(SlimsearchError, ValueError):
    """Bad user input: the message names the field, the value and the fix."""


class TrialError(SlimsearchError):
    """A trial could not be built or measured; recorded as FAIL, the search continues."""


class TrialStopped(SlimsearchError):
    """A trial stopped on purpose before it finished: by the run's deadline (``by_deadline``:
    it runs again when the search continues) or as hopeless (early stopping). Recorded
    PRUNED with this message as the reason, never as a result."""

    def __init__(self, message: str, *, by_deadline: bool = False) -> None:
        super().__init__(message)
        self.by_deadline = by_deadline


class ArtifactError(SlimsearchError):
    """A model file or bundle that is missing, corrupt or not a slimsearch artifact."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def registered(registry: Mapping[str, T], field_name: str, name: str) -> T:
    """``registry[name]``, or ``ConfigError`` naming the experiment field ``field_name``, the
    value, the registered names and the closest of them."""
    if name not in registry:
        raise ConfigError(f"{field_name} = {name!r} is not allowed; expected one of "
                          f"{tuple(registry)}{did_you_mean(name, registry)}")
    return registry[name]

