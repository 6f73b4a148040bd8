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


def load_study(run_dir: str | Path) -> optuna.Study:
    """The run's study, from the storage its run.json records (the report never writes to it)."""
    folder = RunFolder(Path(run_dir))
    settings = folder.settings()
    storage = open_storage(folder.root, settings.get("storage"))
    return optuna.load_study(study_name=settings["study_name"], storage=storage)
