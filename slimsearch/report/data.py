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
from slimsearch.evaluators import untrained_teacher
from slimsearch.report.pareto import non_dominated
from slimsearch.report.picks import dominating
from slimsearch.run import RunFolder, load_study
from slimsearch.spaces import Recipe


@dataclass(frozen=True)
class TrialPoint:
    """One trial as the report sees it; ``metrics`` is None unless it completed. A trial
    answered from an earlier one with the same recipe has state ``DUPLICATE`` (its ``error``
    says which)."""

    number: int
    state: str
    recipe: dict[str, Any] | None
    metrics: dict[str, Any] | None
    baseline: str | None
    error: str | None
    pareto: bool
    seconds: float | None
    #: Meets every constraint of the experiment (True when there are none).
    feasible: bool = True
    #: Why a PRUNED trial was stopped (the time budget, or early stopping).
    stopped: str | None = None
    #: The starting recipe it ran, when the sensitivity pre-pass enqueued it.
    start: str | None = None
    #: What it changed in which front trial, when it refined the front (search.refine).
    refine: str | None = None

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
    #: The run's sensitivity pre-pass (``search.sensitivity``), if it ran.
    sensitivity: dict[str, Any] | None = None
    #: The last confirmation pass (``slimsearch.confirm``): the Pareto trials' latencies
    #: measured again in one session, by trial number (as a string), if one ran.
    confirmed: dict[str, Any] | None = None

    @property
    def completed(self) -> list[TrialPoint]:
        return [t for t in self.trials if t.state == "COMPLETE"]

    @property
    def metric(self) -> str:
        """The name of the search's accuracy objective (``tasks.metrics``; ``accuracy`` for a
        run from before metrics had names)."""
        for metrics in [self.teacher or {}, *(t.metrics for t in self.completed)]:
            if metrics.get("metric"):
                return str(metrics["metric"])
        return "accuracy"

    @property
    def pareto(self) -> list[TrialPoint]:
        """Pareto-optimal trials, best validation accuracy first."""
        return sorted((t for t in self.trials if t.pareto),
                      key=lambda t: (-t.metrics["val_accuracy"], t.metrics["size_bytes"]))

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)

    @property
    def feasible(self) -> list[TrialPoint]:
        return [t for t in self.completed if t.feasible]

    @property
    def candidates(self) -> list[TrialPoint]:
        """The trials a pick chooses from: those meeting the experiment's constraints, or every
        completed trial while none does (the best so far, flagged as such by the callers)."""
        return self.feasible or self.completed

    @property
    def constraints(self) -> dict[str, Any]:
        """The experiment's configured constraints (name -> limit)."""
        rules = self.settings["experiment"].get("constraints", {})
        return {k: v for k, v in rules.items() if k.startswith("max_") and v is not None}

    @property
    def latency_cache(self) -> tuple[int, int]:
        """(latency figures reused from the cache, all latency figures) over completed trials:
        an executed form measured once in the run is not measured again."""
        flags = [v for t in self.completed for k, v in t.metrics.items()
                 if k.startswith("latency") and k.endswith("_cached")]
        return sum(bool(v) for v in flags), len(flags)

    @property
    def scaled_latency(self) -> list[TrialPoint]:
        """Completed trials whose latency was measured while the machine was disturbed and
        scaled by the probe's slowdown (``latency_disturbed``): on the reference VM such
        figures fell from 15% below to 25% above the undisturbed ones (benchmarks/RESULTS.md),
        where undisturbed repeats agreed within a few percent."""
        return [t for t in self.completed if t.metrics.get("latency_disturbed")]

    @property
    def unstable_latency(self) -> list[TrialPoint]:
        """Completed trials whose latency ratio to the teacher never settled, even measured
        again later (``latency_unstable``): their figure is the slow end of its interval."""
        return [t for t in self.completed
                if t.metrics.get("latency_unstable") and t.metrics.get("latency_ratio")]

    @property
    def teacher_warning(self) -> str | None:
        """Why the teacher is no yardstick (no better than the most common class), or None."""
        return untrained_teacher(self.teacher)

    @property
    def against_baselines(self) -> list[tuple[TrialPoint, list[int]]]:
        """Each completed seeded baseline (``teacher``, ``uniform-int8``, ...) with the
        searched trials (every completed trial that is not a baseline) that strictly dominate
        it: better in validation accuracy, size and latency alike. An empty list says plainly
        that the search has not beaten that baseline. Where the confirmation pass timed a
        trial against the baseline side by side (their latency figures did not tell which
        is faster), that verdict decides latency (``confirm.head_to_head``)."""
        searched = {t.number: t.metrics for t in self.completed if not t.baseline}
        return [(t, dominating(searched, t.metrics, faster=self.side_by_side(t.number)))
                for t in self.completed if t.baseline]

    def timed_against(self, baseline: int) -> dict[str, dict[str, Any]]:
        """The searched trials the last confirmation pass timed side by side against seeded
        baseline trial ``baseline``, by trial number (a string): their latency ratio to it,
        its interval and ``faster`` (``confirm.head_to_head``)."""
        return ((self.confirmed or {}).get("baselines") or {}).get(str(baseline), {})

    def side_by_side(self, baseline: int) -> dict[int, bool]:
        """Whether each searched trial timed side by side against seeded baseline trial
        ``baseline`` in the last confirmation pass was faster, by trial number."""
        return {int(n): bool(v["faster"]) for n, v in self.timed_against(baseline).items()}

    @property
    def slower_than_teacher(self) -> list[TrialPoint]:
        return [t for t in self.completed if t.metrics.get("slower_than_teacher")]


def load_report_data(run_dir: str | Path) -> ReportData:
    """Read the study and the run folder into ``ReportData``."""
    folder = RunFolder(Path(run_dir))
    settings = folder.settings()
    study = load_study(folder.root)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # Optuna's front holds feasible trials only; with none feasible yet, the report shows the
    # best so far (the front of every completed trial) and says so.
    # A trial answered from an earlier one with the same recipe (``duplicate_of``) has no
    # model of its own: the front shows the original.
    complete = [t for t in complete if "duplicate_of" not in t.user_attrs]
    pareto = ({t.number for t in study.best_trials if "duplicate_of" not in t.user_attrs}
              if complete else set())
    if complete and not pareto:
        pareto = {t.number for t in _non_dominated(complete, study.directions)}
    teacher_file = folder.teacher / "metrics.json"
    points = []
    for t in trials:
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else None)
        duplicate = t.user_attrs.get("duplicate_of")
        points.append(TrialPoint(
            number=t.number, state="DUPLICATE" if duplicate is not None else t.state.name,
            recipe=t.user_attrs.get("recipe"),
            metrics=t.user_attrs.get("metrics")
            if t.state == TrialState.COMPLETE and duplicate is None else None,
            baseline=t.user_attrs.get("baseline"),
            error=t.user_attrs.get("error") if duplicate is None else
            f"the recipe of trial {duplicate} again: answered with its figures, nothing built",
            pareto=t.number in pareto, seconds=seconds,
            feasible=all(v <= 0 for v in t.constraints.values()),
            stopped=t.user_attrs.get("stopped"), start=t.user_attrs.get("start"),
            refine=t.user_attrs.get("refine")))
    return ReportData(run_dir=folder.root, name=settings["study_name"], settings=settings,
                      teacher=read_json(teacher_file) if teacher_file.exists() else {},
                      trials=points, sensitivity=_optional(folder.sensitivity),
                      confirmed=_confirmed(folder, pareto))


def _confirmed(folder: RunFolder, pareto: set[int]) -> dict[str, Any] | None:
    """The last confirmation pass, if it confirmed today's front (a front that changed since,
    by a resumed search, makes it stale: then None)."""
    found = _optional(folder.confirmed)
    if found is None or set(found["trials"]) != {str(n) for n in pareto}:
        return None
    return found


def _optional(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.exists() else None


def _non_dominated(trials: list, directions: list) -> list:
    """Trials no other trial beats in every objective (ties allowed)."""
    signs = [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in directions]
    keep = set(non_dominated({t.number: [s * v for s, v in zip(signs, t.values, strict=True)]
                              for t in trials}))
    return [t for t in trials if t.number in keep]


def pareto_document(data: ReportData) -> dict[str, Any]:
    """The machine-readable ``pareto.json``: the teacher and the Pareto trials."""
    return {"run": data.name, "objectives": {"val_accuracy": "maximize",
                                             "size_bytes": "minimize",
                                             "latency_ms": "minimize"},
            "note": "selected on the validation split; test_accuracy is for information only",
            "constraints": data.constraints,
            "feasible_trials": len(data.feasible),
            "teacher": data.teacher,
            "trials": [{"number": t.number, "baseline": t.baseline, "feasible": t.feasible,
                        "recipe": t.recipe, "metrics": t.metrics} for t in data.pareto],
            # each seeded baseline and the searched trials better in all three objectives
            "baselines": {t.baseline: {"trial": t.number, "strictly_dominated_by": beaten_by}
                          for t, beaten_by in data.against_baselines}}
