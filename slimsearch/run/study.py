"""The run's Optuna study as everything above the search reads it: its objectives and where
it is stored. Reading needs no search engine code, only Optuna's storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from slimsearch.run.folder import RunFolder
from slimsearch.run.storage import open_storage

#: The objectives, in the order the study stores them, with their directions.
OBJECTIVES = (("val_accuracy", "maximize"), ("size_bytes", "minimize"), ("latency_ms", "minimize"))


def better_in(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The objectives in which trial metrics ``a`` are strictly better than ``b``."""
    return [key for key, direction in OBJECTIVES
            if (a[key] > b[key] if direction == "maximize" else a[key] < b[key])]


def strictly_better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Trial metrics ``a`` beat ``b`` in every objective: higher validation accuracy, fewer
    bytes and lower latency (not merely no worse in one of them)."""
    return len(better_in(a, b)) == len(OBJECTIVES)


def undecided(trial: dict[str, Any], baseline: dict[str, Any]) -> bool:
    """Whether trial metrics ``trial`` beat ``baseline``'s in validation accuracy and bytes
    while their latency figures cannot say which is faster: two executed forms (one form is
    one reading, ``evaluators.latency_cache``), each timed against the teacher, whose
    ratios' intervals overlap. A figure timed alone (CUDA) has no such interval: its
    comparison stands. The confirmation pass times such a pair side by side
    (``confirm.head_to_head``); the chase after a baseline treats it as not beaten yet."""
    if not {"val_accuracy", "size_bytes"} <= set(better_in(trial, baseline)):
        return False
    if trial.get("latency_signature") and trial.get("latency_signature") == baseline.get(
            "latency_signature"):
        return False
    bounds = [m.get(k) for m in (trial, baseline) for k in ("latency_ratio_low", "latency_ratio_high")]
    if any(b is None for b in bounds):
        return False
    low, high, their_low, their_high = bounds
    return low <= their_high and their_low <= high


def decidedly_better(trial: dict[str, Any], baseline: dict[str, Any]) -> bool:
    """``strictly_better`` by latency figures that can tell (not ``undecided``): what no
    side-by-side timing is needed for."""
    return strictly_better(trial, baseline) and not undecided(trial, baseline)


def load_study(run_dir: str | Path) -> optuna.Study:
    """The run's study, from the storage its run.json records (the report never writes to it)."""
    folder = RunFolder(Path(run_dir))
    settings = folder.settings()
    storage = open_storage(folder.root, settings.get("storage"))
    return optuna.load_study(study_name=settings["study_name"], storage=storage)
