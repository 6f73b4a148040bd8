"""Where a running trial is: its stage, epoch and time so far.

A trial of a pretrained transformer trains for minutes, so the run says where it is (stage,
epoch, elapsed) once the trial has run longer than ``QUIET_SECONDS``, and writes the same
into the trial's folder (``progress.json``, replaced atomically at every step), where
``slimsearch status`` reads it for the trials that are running, on any backend."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimsearch.atomic import read_json, write_json

PROGRESS_FILE = "progress.json"
#: A trial says where it is only once it has run this long (seconds): a digits trial that
#: is over in seconds says nothing more than its result line.
QUIET_SECONDS = 30.0


def minutes(seconds: float) -> str:
    """``95`` -> ``"1 min 35 s"``; ``42`` -> ``"42 s"``."""
    whole = int(round(seconds))
    return f"{whole // 60} min {whole % 60} s" if whole >= 60 else f"{whole} s"


class TrialProgress:
    """The progress of one trial, kept in ``trial_dir/progress.json`` and said when long."""

    def __init__(self, trial_dir: Path, say: Callable[[str], None] = print) -> None:
        self.path = trial_dir / PROGRESS_FILE
        self.number = int(trial_dir.name) if trial_dir.name.isdigit() else trial_dir.name
        self.say = say
        self.started = time.time()
        self._stage: tuple[str, float] | None = None

    def at(self, stage: str, epoch: int | None = None, epochs: int | None = None) -> None:
        """The trial is now at ``stage`` (and, training, before epoch ``epoch + 1`` of
        ``epochs``)."""
        now = time.time()
        if self._stage is None or self._stage[0] != stage:
            self._stage = (stage, now)
        where = stage if epoch is None else f"{stage}, epoch {epoch + 1}/{epochs}"
        write_json(self.path, {"stage": stage, "epoch": epoch, "epochs": epochs, "where": where,
                               "trial_started_unix": self.started,
                               "stage_started_unix": self._stage[1], "updated_unix": now})
        if now - self.started >= QUIET_SECONDS:
            self.say(f"  trial {self.number}: {where} ({minutes(now - self.started)} into the "
                     "trial)")


def describe_progress(trial_dir: Path, now: float | None = None) -> str | None:
    """``"distillation, epoch 2/2 for 40 s, 1 min 52 s into the trial"`` from a running
    trial's folder; None when it has not written one (yet)."""
    path = trial_dir / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        found: dict[str, Any] = read_json(path)
    except ValueError:  # written by another process this instant: said next time
        return None
    now = time.time() if now is None else now
    return (f"{found['where']} for {minutes(now - found['stage_started_unix'])}, "
            f"{minutes(now - found['trial_started_unix'])} into the trial")
