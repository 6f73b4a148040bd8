"""The one trial lifecycle that every backend uses: the claim on the budget, what a trial
records, how each outcome is told, and the streak of identical failures that stops a run.
A backend only dispatches, so what is checked here holds for the local and the Ray backend."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from slimsearch.experiment import ExperimentConfig, SpaceConfig
from slimsearch.run import OBJECTIVES, RunFolder
from slimsearch.search.lifecycle import SAME_FAILURES_TO_STOP, Outcome, TrialLifecycle
from slimsearch.search.recovery import OWNER
from slimsearch.spaces import SearchSpace
from slimsearch.tasks import Task

METRICS = {"val_accuracy": 0.9, "size_bytes": 1000, "latency_ms": 0.05, "latency_cv": 0.01,
           "size_ratio": 3.0, "speedup": 1.5}


@pytest.fixture
def said() -> list[str]:
    """The progress lines the lifecycle says."""
    return []


@pytest.fixture
def lifecycle(tmp_path: Path, digits_mlp_task: Task, said: list[str]) -> TrialLifecycle:
    config = ExperimentConfig(name="t", task="digits-mlp", seed=7,
                              space=SpaceConfig(bits=(8, 32), sparsity=(0.0, 0.5)))
    study = optuna.create_study(directions=[d for _, d in OBJECTIVES],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    return TrialLifecycle(study, SearchSpace(digits_mlp_task, config.space), RunFolder(tmp_path),
                          config, budget=3, teacher_metrics=dict(METRICS), say=said.append)


def test_a_started_trial_records_its_owner_seed_and_recipe(lifecycle: TrialLifecycle,
                                                         said: list[str]) -> None:
    started = lifecycle.start()
    assert started is not None and started.recipe is not None and started.error is None
    attrs = started.trial.user_attrs
    assert attrs[OWNER]["pid"] and attrs["seed"] == 7 + started.number == started.seed
    assert attrs["recipe"] == started.recipe.to_dict() and started.position == "1/3"
    assert lifecycle.finish(started, Outcome("COMPLETE", metrics=dict(METRICS))) \
        == TrialState.COMPLETE
    trial = lifecycle.study.trials[0]
    assert trial.values == [METRICS[name] for name, _ in OBJECTIVES]
    assert trial.user_attrs["metrics"]["feasible"] is True
    assert "[1/3] trial 0 done" in said[-1]


def test_a_seeded_baseline_trains_with_the_runs_seed_wherever_it_runs(
        lifecycle: TrialLifecycle) -> None:
    baselines = lifecycle.space.baselines()
    lifecycle.study.enqueue_trial({}, user_attrs={"start": "first"})
    lifecycle.study.enqueue_trial(lifecycle.space.params_of(baselines["uniform-int8"]),
                                  user_attrs={"baseline": "uniform-int8"})
    first, baseline = lifecycle.start(), lifecycle.start()
    assert (first.seed, baseline.seed) == (7 + 0, 7)  # as `build` with the experiment's seed
    assert baseline.recipe == baselines["uniform-int8"]
    assert baseline.trial.user_attrs["seed"] == 7


def test_the_budget_counts_running_trials_and_not_interrupted_ones(
        lifecycle: TrialLifecycle) -> None:
    running = [lifecycle.start() for _ in range(3)]
    assert lifecycle.start() is None  # three running claim the budget of three
    lifecycle.finish(running[0], Outcome("FAIL", error="KeyboardInterrupt", interrupted=True))
    again = lifecycle.start()  # the interrupted one does not count, and runs again
    assert again is not None and again.trial.params == running[0].trial.params
    assert again.trial.user_attrs["retry_of"] == running[0].number
    assert again.seed == running[0].seed == 7 + running[0].number  # the same build again


def test_a_trial_stopped_by_the_deadline_is_pruned_and_runs_again(
        lifecycle: TrialLifecycle, said: list[str]) -> None:
    started = lifecycle.start()
    state = lifecycle.finish(started, Outcome("PRUNED", stopped="the run's time budget ran out",
                                              by_deadline=True))
    assert state == TrialState.PRUNED and lifecycle.pruned == 1
    trial = lifecycle.study.trials[0]
    assert trial.user_attrs["interrupted"] and trial.user_attrs["stopped"]
    assert "it runs again" in said[-1]
    assert lifecycle.study.trials[-1].state == TrialState.WAITING  # enqueued again


def test_the_same_error_in_a_row_stops_the_run_and_anything_else_breaks_the_streak(
        lifecycle: TrialLifecycle) -> None:
    lifecycle.budget = 100

    def fail(message: str) -> None:
        lifecycle.finish(lifecycle.start(), Outcome("FAIL", error=message))

    for i in range(SAME_FAILURES_TO_STOP - 1):
        fail(f"RuntimeError: shapes (1x{i} and 32x10)")  # the same error, other numbers
    lifecycle.finish(lifecycle.start(), Outcome("PRUNED", stopped="hopeless"))
    assert lifecycle.stopped is None  # a PRUNED trial broke the streak (local and Ray alike)
    for i in range(SAME_FAILURES_TO_STOP):
        assert lifecycle.stopped is None
        fail(f"RuntimeError: shapes (1x{i} and 32x10)")
    assert lifecycle.stopped and "the same error" in lifecycle.stopped
    assert lifecycle.failed == 2 * SAME_FAILURES_TO_STOP - 1


def test_a_trial_told_by_another_worker_meanwhile_is_dropped(lifecycle: TrialLifecycle,
                                                            said: list[str]) -> None:
    started = lifecycle.start()
    lifecycle.study.tell(started.trial, state=TrialState.FAIL)  # recovered elsewhere
    assert lifecycle.finish(started, Outcome("COMPLETE", metrics=dict(METRICS))) is None
    assert "recovered by another worker" in said[-1]
    assert lifecycle.completed == 0


def test_an_outcome_crosses_to_the_driver_as_plain_data() -> None:
    import json

    outcome = Outcome("PRUNED", stopped="x", by_deadline=True)
    assert Outcome.from_dict(json.loads(json.dumps(outcome.to_dict()))) == outcome


def test_a_recipe_drawn_again_is_answered_from_the_finished_trial(
        lifecycle: TrialLifecycle, said: list[str]) -> None:
    """Nothing is trained twice: a trial that draws a completed trial's recipe is told that
    trial's figures at once, recorded as its duplicate (and not as a new Pareto point)."""
    from slimsearch.search.lifecycle import done_line

    first = lifecycle.start()
    assert first.answered is None
    lifecycle.finish(first, Outcome("COMPLETE", metrics=dict(METRICS)))
    lifecycle.study.enqueue_trial(first.trial.params)
    again = lifecycle.start()
    assert again.recipe == first.recipe and again.answered is not None
    assert again.answered.metrics["duplicate_of"] == first.number
    assert lifecycle.finish(again, again.answered) == TrialState.COMPLETE
    trial = lifecycle.study.trials[again.number]
    assert trial.values == lifecycle.study.trials[first.number].values
    assert trial.user_attrs["duplicate_of"] == first.number
    folder = lifecycle.folder.trial(again.number)  # its recipe and figures, and no model
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "recipe.json"]
    assert f"drew the recipe of trial {first.number} again" in said[-1]
    assert lifecycle.duplicates == 1 and lifecycle.completed == 2
    assert "Pareto front 1," in done_line(lifecycle.study, first.number,
                                          trial.user_attrs["metrics"], seconds=1.0,
                                          position="1/3")


def test_a_long_trial_says_where_it_is_and_status_reads_it(tmp_path: Path) -> None:
    from slimsearch.search.progress import TrialProgress, describe_progress

    said: list[str] = []
    trial_dir = tmp_path / "00005"
    trial_dir.mkdir()
    progress = TrialProgress(trial_dir, say=said.append)
    progress.at("distillation", 0, 2)
    assert said == []  # a short trial says nothing more than its result line
    progress.started -= 100  # as if the trial had run for 100 s
    progress.at("distillation", 1, 2)
    assert said == ["  trial 5: distillation, epoch 2/2 (1 min 40 s into the trial)"]
    where = describe_progress(trial_dir, now=progress.started + 112)
    assert where == "distillation, epoch 2/2 for 12 s, 1 min 52 s into the trial"
    assert describe_progress(tmp_path) is None


def test_a_long_training_stage_is_judged_hopeless_at_its_middle_not_after_two_epochs(
        digits_mlp_task: Task) -> None:
    """A student distilled for 15 epochs climbs far in its first half (a digits-cnn student
    sliced to half width: 0.77 validation accuracy after 2 epochs, 0.89 at the end), so the
    early stop of ``[constraints]`` judges a long stage at its middle; a short one after
    ``early_stop_after_epochs``, before its last epoch."""
    import dataclasses

    import torch

    from slimsearch.errors import TrialStopped
    from slimsearch.experiment import ConstraintsConfig
    from slimsearch.search.objective import TrialRunner

    config = ExperimentConfig(name="t", task="digits-mlp",
                              constraints=ConstraintsConfig(max_accuracy_drop=0.01,
                                                            early_stop_margin=0.05))
    runner = TrialRunner(config=config, task=digits_mlp_task, teacher=None,
                         device=torch.device("cpu"), teacher_metrics=dict(METRICS))
    untrained = digits_mlp_task.make_model(**digits_mlp_task.teacher_kwargs)  # ~10% accurate
    judged = {}
    for epochs in (15, 5, 2, 1):
        judged[epochs] = []
        for epoch in range(epochs):  # the check runs before each epoch, with `epoch` done
            try:
                runner.early_stop(untrained, "distillation", epoch, epochs)
            except TrialStopped:
                judged[epochs].append(epoch)
    assert judged == {15: [7], 5: [2], 2: [1], 1: []}
    # unless both are set (the margin is off by default), nothing is judged hopeless
    for rules in (ConstraintsConfig(), ConstraintsConfig(max_accuracy_drop=0.01)):
        runner.config = dataclasses.replace(config, constraints=rules)
        runner.early_stop(untrained, "distillation", 7, 15)
