"""One trial from its claim on the budget to its record in the study, the same for every backend.

    start()    claim a place in the budget under the run lock (so workers do not overshoot it),
               ask the study, record the owner first (a killed worker is found by it), start
               the heartbeat, record the seed and draw the recipe
               (a recipe a completed trial had is answered with its figures: ``answered``)
    execute()  (in the process that builds the model) the trial runner; the trial's own
               failures are outcomes, never exceptions
    finish()   tell the study: COMPLETE with its constraints and figures, PRUNED (run again when
               the deadline stopped it), FAIL with its error (run again when it was not the
               recipe's fault: Ctrl-C, the run ending); say the progress line; stop the run
               after the same error ``SAME_FAILURES_TO_STOP`` times in a row

A backend (``Backend``, registered in ``search.backends``) only dispatches: the local backend
runs ``execute`` in its own process between ``start`` and ``finish``; the Ray backend calls
``start`` and ``finish`` on the driver and ``execute`` in a Ray worker.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch
from optuna.trial import TrialState

from slimsearch.atomic import read_json, write_json, write_text
from slimsearch.devices import free_memory
from slimsearch.errors import TrialStopped
from slimsearch.experiment import ExperimentConfig
from slimsearch.run import OBJECTIVES, RunFolder
from slimsearch.search import refine
from slimsearch.search.objective import TrialRunner, constraint_values
from slimsearch.search.recovery import (
    OWNER,
    claimed,
    enqueue_again,
    heartbeat,
    run_lock,
    this_process,
)
from slimsearch.spaces import Recipe, SearchSpace

#: This many trials in a row failing with the same error stop the run: the cause is not the
#: recipe (they all differ) but something every trial shares, and the night would be wasted.
SAME_FAILURES_TO_STOP = 5


@dataclass(frozen=True)
class Outcome:
    """How a trial ended; plain data, so it crosses to the Ray driver as JSON."""

    state: str  # "COMPLETE", "PRUNED" or "FAIL"
    metrics: dict[str, Any] | None = None
    #: Why a PRUNED trial stopped, and whether it was the run's deadline (then it runs again).
    stopped: str | None = None
    by_deadline: bool = False
    #: A FAIL's error, and whether it was not the recipe's fault (then it runs again and does
    #: not count toward the budget or the streak of identical failures).
    error: str | None = None
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        return cls(**data)


@dataclass(frozen=True)
class Dispatch:
    """What a backend is given to run one session's trials."""

    lifecycle: TrialLifecycle
    #: This process's trial runner (the teacher loaded, its metrics measured).
    runner: TrialRunner
    #: Builds the same runner in another process, from the run folder (picklable).
    make_runner: Callable[[], TrialRunner]
    #: No trial starts after it (``time.monotonic()``; ``math.inf``: none).
    deadline: float
    #: Trials at once (``--workers``), and which local worker process this is (0: the main).
    workers: int = 1
    worker: int = 0
    #: How to start another ``slimsearch run`` on this run (local worker processes).
    experiment_file: Path | None = None
    storage_url: str | None = None


class Backend(Protocol):
    """A way to dispatch trials. It lets ``TrialLifecycle`` start and finish every trial, so the
    claim on the budget, the records, the telling and the failure streak are the same on all."""

    #: The ``search.backend`` value that selects it.
    name: str

    def check(self, config: ExperimentConfig, device: torch.device) -> None:
        """Raise ``ConfigError`` if this backend cannot run ``config`` (before anything is
        written or trained)."""

    def describe(self, workers: int) -> str:
        """How trials run, for the run's first line (", 2 workers"; "" for the plain case)."""

    def run(self, dispatch: Dispatch) -> None:
        """Run trials until the budget is claimed, the deadline passes or the lifecycle stops
        the run. Ctrl-C: the running trials are told (FAIL, interrupted) and
        KeyboardInterrupt goes on."""


@dataclass
class Started:
    """A trial asked of the study and not yet told."""

    trial: optuna.Trial
    seed: int
    #: "n/budget": where it stands in the budget, for the progress lines.
    position: str
    recipe: Recipe | None
    #: Why drawing its recipe failed (then it is told FAIL at once).
    error: str | None = None
    #: The outcome it was given without building anything: FAIL when drawing its recipe
    #: failed, or a finished trial's figures when it drew that trial's recipe again.
    answered: Outcome | None = None
    began: float = field(default_factory=time.perf_counter)
    beat: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def number(self) -> int:
        return self.trial.number


def execute(runner: TrialRunner, recipe: Recipe, trial_dir: Path, *, seed: int,
            deadline: float | None) -> Outcome:
    """Build and measure one trial; its failures (an exception, NaN loss, out of memory) come
    back as a FAIL outcome with the traceback in ``trial_dir/error.txt``. Ctrl-C propagates."""
    try:
        return Outcome("COMPLETE", metrics=runner(recipe, trial_dir, seed=seed,
                                                  deadline=deadline))
    except TrialStopped as exc:
        return Outcome("PRUNED", stopped=str(exc), by_deadline=exc.by_deadline)
    except Exception as exc:
        failed = Outcome("FAIL", error=failure(exc, trial_dir))
    # out of the except block: its traceback, and with it the trial's tensors, is gone now
    free_memory(runner.device)
    return failed


def failure(exc: BaseException, trial_dir: Path) -> str:
    """The error of a failed trial, in one line; its traceback goes to ``trial_dir/error.txt``.
    Call it while ``exc`` is being handled."""
    write_text(trial_dir / "error.txt", traceback.format_exc())
    return describe_error(exc)


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class TrialLifecycle:
    """Starts and finishes the trials of one session of a run, and counts them."""

    def __init__(self, study: optuna.Study, space: SearchSpace, folder: RunFolder,
                 config: ExperimentConfig, *, budget: int, teacher_metrics: dict[str, Any],
                 say: Callable[[str], None], backend: str = "local") -> None:
        self.study, self.space, self.folder, self.config = study, space, folder, config
        self.budget, self.teacher_metrics, self.say, self.backend = (budget, teacher_metrics,
                                                                     say, backend)
        self.completed = self.failed = self.pruned = 0
        #: Completed trials answered from an earlier trial with the same recipe.
        self.duplicates = 0
        #: Completed trials whose latency came from the run's latency cache.
        self.cached = 0
        #: Why the run stops early (the same error trial after trial), once it does.
        self.stopped: str | None = None
        self._failures: list[str] = []
        #: The sensitivity pre-pass, read when refinement first needs it.
        self._sensitivity: dict[str, Any] | None = None

    def start(self) -> Started | None:
        """Claim a place in the budget and ask the study for a trial; None when finished and
        running trials (of every worker) already claim the whole budget."""
        with run_lock(self.folder.root):  # check and claim at once, or two workers could both
            taken = claimed(self.study)
            if taken >= self.budget:
                return None
            self._refine_if_due(taken)
            with warnings.catch_warnings():  # "heartbeat is meant for optimize": we run it
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = self.study.ask()
            trial.set_user_attr(OWNER, this_process())  # first: a killed worker is found by it
        # A seeded baseline trains with the run's own seed, as `build` would for that recipe
        # in this experiment: its figures do not depend on where the queue put it (and are
        # those of the same recipe built by hand), and a search's aim to beat it is fixed.
        # A trial run again after an interruption trains with its own seed (recovery
        # enqueues it with that seed): the same build, run again.
        seed = (self.config.seed if trial.user_attrs.get("baseline")
                else trial.user_attrs.get("seed", self.config.seed + trial.number))
        started = Started(trial, seed=seed,
                          position=f"{taken + 1}/{self.budget}", recipe=None)
        started.beat.enter_context(heartbeat(self.study, trial))  # RDB: others see it alive
        if self.backend != "local":
            trial.set_user_attr("backend", self.backend)
        trial.set_user_attr("seed", started.seed)
        try:
            started.recipe = self.space.suggest(trial)
            trial.set_user_attr("recipe", started.recipe.to_dict())
            started.answered = self._answer_duplicate(trial, started.recipe)
        except Exception as exc:  # a bug in the space or the task's factory: a failed trial
            started.recipe, started.error = None, failure(exc, self.folder.trial(trial.number))
            started.answered = Outcome("FAIL", error=started.error)
        except KeyboardInterrupt:  # not the trial's fault: it runs again
            self.finish(started, Outcome("FAIL", error="KeyboardInterrupt", interrupted=True))
            raise
        return started

    def _answer_duplicate(self, trial: optuna.Trial, recipe: Recipe) -> Outcome | None:
        """A completed trial's figures when ``recipe`` is exactly its recipe (samplers repeat
        themselves: TPE drew 3 of 24 digits-mlp recipes twice). Building it again would cost
        minutes to learn what the study knows, up to the training seed: it is answered from
        that trial, recorded as ``duplicate_of`` (the sampler sees the same values there;
        the report, pick and export show the original, whose model file it is; its folder
        holds its recipe and those figures, and no model)."""
        wanted = recipe.to_dict()
        for earlier in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if (earlier.user_attrs.get("recipe") == wanted and "metrics" in earlier.user_attrs
                    and "duplicate_of" not in earlier.user_attrs):
                trial.set_user_attr("duplicate_of", earlier.number)
                metrics = dict(earlier.user_attrs["metrics"], duplicate_of=earlier.number)
                # its folder says so: the recipe and the figures, no model file
                trial_dir = self.folder.trial(trial.number)
                trial_dir.mkdir(parents=True, exist_ok=True)
                write_text(trial_dir / "recipe.json", recipe.to_json() + "\n")
                write_json(trial_dir / "metrics.json", metrics)
                return Outcome("COMPLETE", metrics=metrics)
        return None

    def _refine_if_due(self, taken: int) -> None:
        """When the ``taken``-th trial of the budget is one of ``search.refine``'s share and
        nothing waits in the queue, enqueue a neighbour of the front (``refine.propose``);
        the next ``ask`` takes it."""
        share = self.config.search.refine
        if share <= 0 or self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return
        completed = len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if not refine.due(taken, completed, share):
            return
        if self._sensitivity is None and self.folder.sensitivity.exists():
            self._sensitivity = read_json(self.folder.sensitivity)
        proposal = refine.propose(self.study, self.space, self._sensitivity,
                                  rng=random.Random(self.config.seed * 1_000_003 + taken))
        if proposal is not None:
            params, change = proposal
            self.study.enqueue_trial(params, user_attrs={"refine": change})

    def finish(self, started: Started, outcome: Outcome) -> TrialState | None:
        """Tell the study how ``started`` ended and say so; the state told, or None when
        another worker had recovered the trial meanwhile (its retry counts, not this)."""
        started.beat.close()
        seconds = time.perf_counter() - started.began
        try:
            state, metrics = self._tell(started, outcome)
        except Exception as exc:
            if self._told_elsewhere(started):
                # Another worker recorded it FAIL and enqueued its parameters again while it
                # ran here: its heartbeat went missing for longer than the grace period.
                self.say(f"[{started.position}] trial {started.number} was recovered by "
                         "another worker while it ran (its heartbeat was missed); this result "
                         "is dropped, the retry counts")
                return None
            # a figure the study refuses (a NaN constraint) or a missing one: a failed trial
            outcome = Outcome("FAIL", error=f"its outcome could not be recorded: "
                                            f"{describe_error(exc)}")
            state, metrics = self._tell(started, outcome)
        if state == TrialState.COMPLETE and "duplicate_of" in metrics:
            self.say(f"[{started.position}] trial {started.number} drew the recipe of trial "
                     f"{metrics['duplicate_of']} again: answered with its figures, nothing "
                     "built")
        elif state == TrialState.COMPLETE:
            self.say(done_line(self.study, started.number, metrics, seconds=seconds,
                               position=started.position))
        else:
            what = "PRUNED" if state == TrialState.PRUNED else "FAILED"
            again = (" (it runs again when the search continues)"
                     if outcome.interrupted or outcome.by_deadline else "")
            self.say(f"[{started.position}] trial {started.number} {what} after {seconds:.1f} "
                     f"s: {outcome.stopped if state == TrialState.PRUNED else outcome.error}"
                     f"{again}")
        self._count(state, outcome)
        return state

    def _told_elsewhere(self, started: Started) -> bool:
        """Whether the storage holds ``started`` as finished already (by another worker)."""
        storage, trial = self.study._storage, started.trial  # the storage's own record
        return storage.get_trial(trial._trial_id).state.is_finished()

    def _tell(self, started: Started, outcome: Outcome) -> tuple[TrialState, dict[str, Any]]:
        """Record ``outcome`` in the study; the state and (COMPLETE) the figures as stored."""
        trial, study = started.trial, self.study
        if outcome.state == "COMPLETE":
            metrics = dict(outcome.metrics or {})
            violations = constraint_values(metrics, self.teacher_metrics, self.config.constraints)
            for name, value in violations.items():
                trial.set_constraint(name, value)
            metrics["feasible"] = all(v <= 0 for v in violations.values())
            trial.set_user_attr("metrics", metrics)
            study.tell(trial, [metrics[name] for name, _ in OBJECTIVES])
            return TrialState.COMPLETE, metrics
        if outcome.interrupted or outcome.by_deadline:  # not the recipe's fault: it runs again
            trial.set_user_attr("interrupted", True)
            enqueue_again(study, trial)
        if outcome.state == "PRUNED":
            trial.set_user_attr("stopped", outcome.stopped)
            study.tell(trial, state=TrialState.PRUNED)
            return TrialState.PRUNED, {}
        trial.set_user_attr("error", outcome.error)
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL, {}

    def _count(self, state: TrialState, outcome: Outcome) -> None:
        """The session's counts, and the streak of identical failures that stops the run
        (anything else breaks the streak)."""
        self.completed += state == TrialState.COMPLETE
        self.duplicates += state == TrialState.COMPLETE and "duplicate_of" in (
            outcome.metrics or {})
        self.cached += state == TrialState.COMPLETE and bool(
            (outcome.metrics or {}).get("latency_cached"))
        self.failed += state == TrialState.FAIL
        self.pruned += state == TrialState.PRUNED
        if state != TrialState.FAIL or outcome.interrupted:
            self._failures = []
            return
        self._failures.append(error_kind(outcome.error or ""))
        last = self._failures[-SAME_FAILURES_TO_STOP:]
        if len(last) == SAME_FAILURES_TO_STOP and len(set(last)) == 1:
            self.stopped = same_failures_message(outcome.error, self.folder)
            self.say(f"stopping: {self.stopped}")


def done_line(study: optuna.Study, number: int, metrics: dict, *, seconds: float,
              position: str) -> str:
    """The progress line of a completed trial: its figures and the front so far."""
    front = [t for t in study.best_trials  # feasible only, when there are constraints
             if "duplicate_of" not in t.user_attrs]
    best = max((t.values[0] for t in front), default=None)
    speed = f"{metrics['speedup']:.2f}x" if "speedup" in metrics else "?"
    slower = " SLOWER THAN TEACHER" if metrics.get("slower_than_teacher") else ""
    infeasible = "" if metrics["feasible"] else " INFEASIBLE"
    name = metrics.get("metric", "accuracy")
    best_text = f"best val {name} {best:.4f}" if front else "no feasible trial yet"
    return (f"[{position}] trial {number} done in {seconds:.1f} s: "
            f"{describe_metrics(metrics)} ({metrics['size_ratio']:.1f}x smaller, {speed} speed"
            f"{slower}){infeasible} | Pareto front {len(front)}, {best_text}")


def describe_metrics(metrics: dict) -> str:
    notes = ", cached" if metrics.get("latency_cached") else ""
    if metrics.get("latency_unstable"):
        notes += (", UNSTABLE: the slow end of its interval" if metrics.get("latency_ratio")
                  else ", unstable")
    if metrics.get("latency_ratio") and metrics.get("latency_rounds") is None:
        spread = f"the teacher at rest: fastest of {metrics['latency_attempts']} bursts"
    elif metrics.get("latency_ratio"):  # timed against the teacher (timing.paired)
        spread = f"+-{metrics['latency_window_cv']:.1%} against the teacher"
    else:
        spread = f"cv {metrics['latency_cv']:.2f}"
    return (f"val {metrics.get('metric', 'accuracy')} {metrics['val_accuracy']:.4f}, "
            f"{metrics['size_bytes'] / 1e3:.1f} kB, "
            f"{metrics['latency_ms']:.4f} ms ({spread}{notes})")


def same_failures_message(error: str | None, folder: RunFolder) -> str:
    return (f"the last {SAME_FAILURES_TO_STOP} trials all failed with the same error: {error}. "
            "The recipes differed, so the cause is most likely the task's own code (its model "
            "factory, forward or data) or the training settings; the traceback is in "
            f"{folder.root / 'trials'}/<number>/error.txt. Fix it, then continue with: "
            f"slimsearch resume {folder.root}")


def error_kind(message: str) -> str:
    """An error message with its numbers blanked: the same failure in trials of different
    shapes (``mat1 and mat2 shapes cannot be multiplied (1x16 and 32x10)``) reads alike, and
    so does one naming an object by its address (``<Foo object at 0x7f3a...>``)."""
    return re.sub(r"0x[0-9a-fA-F]+|\d+(\.\d+)?", "#", message)
