"""The run's Optuna study as everything above the search reads it: its objectives and where
it is stored. Reading needs no search engine code, only Optuna's storage."""

from __future__ import annotations

from pathlib import Path

import optuna

from slimsearch.run.folder import RunFolder
from slimsearch.run.storage import open_storage

#: The objectives, in the order the study stores them, with their directions.
OBJECTIVES = (("val_accuracy", "maximize"), ("size_bytes", "minimize"), ("latency_ms", "minimize"))


def load_study(run_dir: str | Path) -> optuna.Study:
    """The run's study, from the storage its run.json records (the report never writes to it)."""
    folder = RunFolder(Path(run_dir))
    settings = folder.settings()
    storage = open_storage(folder.root, settings.get("storage"))
    return optuna.load_study(study_name=settings["study_name"], storage=storage)
