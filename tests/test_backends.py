"""The contract of a search backend, run for every entry of ``search.backends.BACKENDS``.

A backend only dispatches: each trial goes through the lifecycle it is given, and the trial
itself is built by the runner (``Dispatch.runner`` here, ``Dispatch.make_runner`` in another
process). So a runner that builds nothing shows what the backend alone does: it fills the
budget and no more, tells the study every trial's outcome, stops on the same error trial after
trial, and starts nothing after the deadline. What a real trial does on each backend is tested
end to end in test_cli.py, test_recovery.py and test_ray_backend.py.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from slimsearch.experiment import ExperimentConfig, SearchConfig, SpaceConfig
from slimsearch.run import OBJECTIVES, RunFolder
from slimsearch.search.backends import BACKENDS, get_backend
from slimsearch.search.lifecycle import SAME_FAILURES_TO_STOP, Dispatch, TrialLifecycle
from slimsearch.spaces import Recipe, SearchSpace
from slimsearch.tasks import Task

TEACHER = {"val_accuracy": 0.9, "size_bytes": 4000, "latency_ms": 0.2, "latency_cv": 0.01}


@dataclass
class ScriptedRunner:
    """A trial runner that builds nothing: each trial's figures follow from its seed, or every
    trial raises ``error``. Ray workers get it by value (see ``ray_workers``)."""

    error: str | None = None
    device: torch.device = torch.device("cpu")
    teacher_metrics: dict[str, Any] | None = None

    def __call__(self, recipe: Recipe, trial_dir: Path, *, seed: int,
                 deadline: float | None = None) -> dict[str, Any]:
        if self.error is not None:
            raise RuntimeError(self.error)
        return {"val_accuracy": 0.8, "size_bytes": 1000 + seed, "latency_ms": 0.1,
                "latency_cv": 0.01, "size_ratio": 4000 / (1000 + seed), "speedup": 2.0}


@pytest.fixture(scope="module")
def ray_workers():
    """Ray on this machine, started by the backend's own check, shut down after the module."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install "
                                            "\"slimsearch[ray]\")")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the runner, by value
    BACKENDS["ray"].check(ExperimentConfig(name="t", task="digits-mlp",
                                           search=SearchConfig(backend="ray")),
                          torch.device("cpu"))
    yield
    ray.shutdown()


@pytest.fixture(params=list(BACKENDS))
def backend_name(request: pytest.FixtureRequest) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_workers")
        request.applymarker(pytest.mark.ray)
    return request.param


def dispatch(backend: str, folder: Path, task: Task, *, budget: int, error: str | None = None,
             deadline: float = math.inf) -> Dispatch:
    config = ExperimentConfig(name="t", task="digits-mlp", seed=7,
                              search=SearchConfig(backend=backend, cpus_per_trial=1),
                              space=SpaceConfig(bits=(8, 32), sparsity=(0.0, 0.5)))
    study = optuna.create_study(directions=[d for _, d in OBJECTIVES],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    lifecycle = TrialLifecycle(study, SearchSpace(task, config.space), RunFolder(folder), config,
                               budget=budget, teacher_metrics=TEACHER, say=print,
                               backend=backend)
    make_runner = functools.partial(ScriptedRunner, error=error, teacher_metrics=TEACHER)
    return Dispatch(lifecycle, make_runner(), make_runner, deadline=deadline)


def test_every_backend_is_registered_under_its_own_name() -> None:
    assert all(b.name == name for name, b in BACKENDS.items())
    with pytest.raises(Exception, match="search.backend = 'rya' is not allowed.*'ray'"):
        get_backend("rya")


def test_a_backend_fills_the_budget_and_tells_every_trial(backend_name: str, tmp_path: Path,
                                                          digits_mlp_task: Task) -> None:
    run = dispatch(backend_name, tmp_path, digits_mlp_task, budget=4)
    BACKENDS[backend_name].run(run)
    trials = run.lifecycle.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # the budget, no more
    assert run.lifecycle.completed == 4 and run.lifecycle.stopped is None
    for trial in trials:  # the figures the runner gave for that trial's seed, in the study
        assert trial.user_attrs["seed"] == 7 + trial.number
        assert trial.values[1] == 1000 + trial.user_attrs["seed"]
        assert Recipe.from_dict(trial.user_attrs["recipe"])
        assert trial.user_attrs.get("backend", "local") == backend_name


def test_a_backend_stops_on_the_same_error_in_every_trial(backend_name: str, tmp_path: Path,
                                                          digits_mlp_task: Task) -> None:
    run = dispatch(backend_name, tmp_path, digits_mlp_task, budget=20,
                   error="CUDA error: device-side assert triggered")
    BACKENDS[backend_name].run(run)
    trials = run.lifecycle.study.trials
    assert run.lifecycle.stopped and "the same error" in run.lifecycle.stopped
    assert [t.state for t in trials] == [TrialState.FAIL] * SAME_FAILURES_TO_STOP
    assert all("device-side assert" in t.user_attrs["error"] for t in trials)
    assert all((tmp_path / "trials" / f"{t.number:05d}" / "error.txt").is_file() for t in trials)


def test_a_backend_starts_nothing_after_the_deadline(backend_name: str, tmp_path: Path,
                                                     digits_mlp_task: Task) -> None:
    run = dispatch(backend_name, tmp_path, digits_mlp_task, budget=4,
                   deadline=time.monotonic() - 1)
    BACKENDS[backend_name].run(run)
    assert run.lifecycle.study.trials == []
