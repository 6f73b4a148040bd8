"""What the report shows, as plain data read from the study and the run folder.

Nothing here draws: ``html.py`` turns ``ReportData`` into a page, and tests check the data.
The Pareto set is Optuna's (``study.best_trials``) over the three objectives the search
optimised: validation accuracy (max), size in bytes (min) and latency in ms (min).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from slimsearch.atomic import read_json
from slimsearch.search.run_folder import RunFolder
from slimsearch.search.storage import open_storage
from slimsearch.spaces import Recipe


@dataclass(frozen=True)
class TrialPoint:
    """One trial as the report sees it; ``metrics`` is None unless it completed."""

    number: int
    state: str
    recipe: dict[str, Any] | None
    metrics: dict[str, Any] | None
    baseline: str | None
    error: str | None
    pareto: bool
    seconds: float | None

    @property
    def summary(self) -> str:
        return Recipe.from_dict(self.recipe).summary() if self.recipe else ""


@dataclass(frozen=True)
class ReportData:
    """Everything on the page: run settings, the teacher's metrics and every trial."""

    run_dir: Path
    name: str
    settings: dict[str, Any]
    teacher: dict[str, Any]
    trials: list[TrialPoint]

    @property
    def completed(self) -> list[TrialPoint]:
        return [t for t in self.trials if t.state == "COMPLETE"]

    @property
    def pareto(self) -> list[TrialPoint]:
        """Pareto-optimal trials, best validation accuracy first."""
        return sorted((t for t in self.trials if t.pareto),
                      key=lambda t: (-t.metrics["val_accuracy"], t.metrics["size_bytes"]))

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)

    @property
    def latency_cache(self) -> tuple[int, int]:
        """(latency figures reused from the cache, all latency figures) over completed trials:
        an executed form measured once in the run is not measured again."""
        flags = [v for t in self.completed for k, v in t.metrics.items()
                 if k.startswith("latency") and k.endswith("_cached")]
        return sum(bool(v) for v in flags), len(flags)

    @property
    def slower_than_teacher(self) -> list[TrialPoint]:
        return [t for t in self.completed if t.metrics.get("slower_than_teacher")]


def load_study(run_dir: Path) -> optuna.Study:
    """Open the run's study read-only in spirit (the report never writes to it)."""
    folder = RunFolder(run_dir)
    settings = folder.settings()
    storage = open_storage(folder.root, settings.get("storage"))
    return optuna.load_study(study_name=settings["study_name"], storage=storage)


def load_report_data(run_dir: str | Path) -> ReportData:
    """Read the study and the run folder into ``ReportData``."""
    folder = RunFolder(Path(run_dir))
    settings = folder.settings()
    study = load_study(folder.root)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pareto = {t.number for t in study.best_trials} if complete else set()
    teacher_file = folder.teacher / "metrics.json"
    points = []
    for t in trials:
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else None)
        points.append(TrialPoint(
            number=t.number, state=t.state.name, recipe=t.user_attrs.get("recipe"),
            metrics=t.user_attrs.get("metrics") if t.state == TrialState.COMPLETE else None,
            baseline=t.user_attrs.get("baseline"), error=t.user_attrs.get("error"),
            pareto=t.number in pareto, seconds=seconds))
    return ReportData(run_dir=folder.root, name=settings["study_name"], settings=settings,
                      teacher=read_json(teacher_file) if teacher_file.exists() else {},
                      trials=points)


def pareto_document(data: ReportData) -> dict[str, Any]:
    """The machine-readable ``pareto.json``: the teacher and the Pareto trials."""
    return {"run": data.name, "objectives": {"val_accuracy": "maximize",
                                             "size_bytes": "minimize",
                                             "latency_ms": "minimize"},
            "note": "selected on the validation split; test_accuracy is for information only",
            "teacher": data.teacher,
            "trials": [{"number": t.number, "baseline": t.baseline, "recipe": t.recipe,
                        "metrics": t.metrics} for t in data.pareto]}
