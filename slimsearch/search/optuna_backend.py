"""The driver of a search: the run's Optuna multi-objective study, set up once, then trials.

Everything is validated before anything is written: the task and its plug-in import, the
space against the task, the device, the storage URL, the Ray cluster when the backend is Ray,
and (for an existing run folder) that the experiment did not change. Then, one process at a
time, the run is created, the teacher trained or loaded and measured like every trial, and the
baselines and starting recipes enqueued. Trials then run until the budget or the deadline,
each through the one trial lifecycle (``lifecycle``), dispatched by the experiment's backend
(``backends``: here and in worker processes, or on Ray), into the same study. A failing trial is
recorded FAIL with its error; the search goes on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from slimsearch.atomic import read_json, write_json
from slimsearch.compression import MODEL_FILE
from slimsearch.devices import computing, device_identity, resolve_device
from slimsearch.errors import ConfigError
from slimsearch.evaluators import LatencyCache, chance_score, untrained_teacher
from slimsearch.experiment import ExperimentConfig
from slimsearch.run import OBJECTIVES
from slimsearch.run.folder import RUN_FORMAT, RunFolder, experiment_copy
from slimsearch.run.storage import (
    JOURNAL_FILE,
    PASSWORD_ENV,
    check_storage_url,
    open_storage,
    public_url,
    shown,
)
from slimsearch.runtimes import get_runtime
from slimsearch.search.backends import get_backend
from slimsearch.search.lifecycle import Dispatch, TrialLifecycle, describe_metrics
from slimsearch.search.objective import (
    TrialRunner,
    environment,
    runner_for_run,
    structured_blocked,
)
from slimsearch.search.recovery import (
    counted,
    recover_stale_trials,
    registered_worker,
)
from slimsearch.search.samplers import make_sampler
from slimsearch.search.sensitivity import (
    measure_sensitivity,
    not_prunable,
    sensitivity_groups,
    starting_recipes,
)
from slimsearch.search.teacher import prepare_teacher
from slimsearch.spaces import Recipe, SearchSpace
from slimsearch.tasks import Task, make_task


@dataclass(frozen=True)
class RunResult:
    """What one invocation of the search did (the caller writes the report from the study)."""

    run_dir: Path
    completed: int
    failed: int
    interrupted: bool
    #: Why the run stopped before its budget and deadline (e.g. the same error every trial).
    stopped: str | None = None


@dataclass(frozen=True)
class Prepared:
    """A validated experiment, ready to run; nothing has been written yet."""

    config: ExperimentConfig
    task: Task
    space: SearchSpace
    folder: RunFolder
    storage_url: str | None


def prepare(config: ExperimentConfig, *, run_dir: Path, storage_url: str | None) -> Prepared:
    """Check everything that can be wrong with the input; raise ``ConfigError`` on the first.
    No file is written and nothing trains. A password in ``storage_url`` moves into this
    process's environment (``storage.PASSWORD_ENV``), where its workers find it."""
    folder = RunFolder(run_dir)
    folder.check_writable()
    if storage_url is not None:  # recorded and shown without its password (see storage)
        storage_url, password = public_url(storage_url)
        if password is not None:
            os.environ[PASSWORD_ENV] = password
    if config.search.storage is not None:
        config = config.with_overrides(search=dataclasses.replace(
            config.search, storage=public_url(config.search.storage)[0]))
    runtime = get_runtime(config.target.runtime)  # the names first: they cost nothing
    backend = get_backend(config.search.backend)
    task = make_task(config.task, seed=config.seed, base_dir=config.base_dir,
                     metrics=config.metrics,
                     options=config.task_options)
    space = SearchSpace(task, config.space)
    task.check_data()
    space.set_not_structured(structured_blocked(task, config.space))
    limit = config.constraints.max_size_bytes
    if limit is not None and limit < (smallest := space.min_weight_bytes()):
        raise ConfigError(
            f"constraints.max_size_bytes = {limit}: no model this space can produce is that "
            f"small; the weights alone of its smallest student, at {min(config.space.bits)} bits "
            f"and the highest sparsity, take {smallest} bytes. Raise the limit above that, or "
            "allow smaller students (space.student), fewer bits or more sparsity")
    device = resolve_device(config.target.device)
    runtime.check(config.target, device)
    backend.check(config, device)  # e.g. that the Ray cluster is there and large enough
    if storage_url is not None:
        check_storage_url(storage_url)
        if not folder.exists() and config.name in optuna.get_all_study_names(open_storage(
                folder.root, storage_url)):
            raise ConfigError(_taken(storage_url, config.name))
    if folder.exists():
        _check_continuation(folder, config, space, storage_url, device)
    return Prepared(config, task, space, folder, storage_url)


def _taken(storage_url: str, name: str) -> str:
    return (f"storage {shown(storage_url)!r} already holds a study named {name!r} that belongs "
            "to another run folder; continue that run with its --run-dir, or give this "
            "experiment another name")


def _check_continuation(folder: RunFolder, config: ExperimentConfig, space: SearchSpace,
                        storage_url: str | None, device: torch.device) -> None:
    folder.check_same_experiment(config.to_dict(), storage_url, fingerprint=space.fingerprint(),
                                 device=device_identity(device), objectives=dict(OBJECTIVES))


def _open_study(prepared: Prepared, experiment_file: Path, experiment_text: str,
                device: torch.device) -> optuna.Study:
    """Create the run (run.json, the experiment's copy, the study) or check that the folder
    holds this experiment's run and that the storage still holds its study. Call it inside
    ``folder.setting_up()``: of two processes starting at once, one creates the run and the
    other then checks against it."""
    config, folder = prepared.config, prepared.folder
    created = not folder.exists()
    if not created:  # checked in prepare, but another process may have created the run since
        _check_continuation(folder, config, prepared.space, prepared.storage_url, device)
    storage = open_storage(folder.root, prepared.storage_url)
    studies = {s.study_name for s in storage.get_all_studies()}
    if created and config.name in studies:  # another run folder's, created since prepare
        raise ConfigError(_taken(prepared.storage_url, config.name))
    if not created and config.name not in studies and (folder.root / "trials").is_dir():
        where = shown(prepared.storage_url) if prepared.storage_url else folder.root / JOURNAL_FILE
        raise ConfigError(
            f"the storage {str(where)!r} does not hold this run's study {config.name!r}, but "
            f"{folder.root} has its trials: a new study there would overwrite their folders. "
            "Point --storage at the database the run was started with (run.json records it), "
            "or start a new run with another --run-dir")
    if created:
        folder.create(experiment_text, {
            "experiment": config.to_dict(), "storage": prepared.storage_url,
            "study_name": config.name, "space_fingerprint": prepared.space.fingerprint(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "run_format": RUN_FORMAT, "objectives": dict(OBJECTIVES),
            "experiment_file": str(experiment_file.resolve()),
            "device": device_identity(device), "environment": environment()})
    study = optuna.create_study(storage=storage, study_name=config.name, load_if_exists=True,
                                directions=[d for _, d in OBJECTIVES])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([n for n, _ in OBJECTIVES])
    return study


def run_search(prepared: Prepared, experiment_file: Path, *, trials: int,
               timeout_s: float | None, say: Callable[[str], None] = print,
               workers: int = 1, worker: int = 0) -> RunResult:
    """Run (or continue) the search until ``trials`` trials exist or ``timeout_s`` passes;
    the caller writes the report.

    ``workers > 1``: once the teacher is ready, the local backend starts ``workers - 1`` more
    processes on the same study, each with its share of the CPU threads for training (latency
    is still measured one at a time, under the device lock); on the Ray backend, that many
    trials run at once. ``worker`` (1, 2, ...): this process is one of those local workers (it enqueues
    nothing); its sampler is seeded apart from the others', or they would propose the same
    trials."""
    config, folder = prepared.config, prepared.folder
    deadline = time.monotonic() + timeout_s if timeout_s else math.inf
    device = resolve_device(config.target.device)
    copy = experiment_copy(experiment_file)  # a ConfigError here leaves nothing behind
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with folder.setting_up(say=say):
        study = _open_study(prepared, experiment_file, copy, device)
    finished = counted(study)
    say = _start_session(prepared, study, finished=finished, trials=trials, workers=workers,
                         worker=worker, say=say)
    interrupted, lifecycle = False, None
    with registered_worker(folder.root):  # so a later worker can tell we are alive
        try:
            recover_stale_trials(study, folder.root, say=say)
            # One process at a time trains the teacher, measures it and the sensitivities and
            # enqueues the first trials; the others then find them done.
            with folder.setting_up(say=say):
                runner = _set_up(prepared, study, device, finished=finished, worker=worker,
                                 budget=trials, say=say)
            lifecycle = TrialLifecycle(study, prepared.space, folder, config, budget=trials,
                                       teacher_metrics=runner.teacher_metrics, say=say,
                                       backend=config.search.backend)
            get_backend(config.search.backend).run(Dispatch(
                lifecycle, runner, functools.partial(runner_for_run, str(folder.root)),
                deadline=deadline, workers=workers, worker=worker,
                experiment_file=experiment_file, storage_url=prepared.storage_url))
            if time.monotonic() >= deadline:
                say("time budget reached: no new trial starts")
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: the running trial is recorded FAIL (not counted in the budget; it "
                "runs again when the search continues); finished trials are kept")
    if lifecycle is None:  # interrupted while the run was set up
        return RunResult(folder.root, 0, 0, interrupted)
    cached = (f"; latency cache: {lifecycle.cached} of {lifecycle.completed} completed trials "
              "reused a measurement" if lifecycle.completed else "")
    if lifecycle.duplicates:
        drew = ("1 drew a finished trial's recipe again and was" if lifecycle.duplicates == 1
                else f"{lifecycle.duplicates} drew a finished trial's recipe again and were")
        cached += f"; {drew} answered with its figures"
    say(f"{lifecycle.completed} trials completed, {lifecycle.failed} failed, {lifecycle.pruned} "
        f"stopped (time budget or early stop) in this session{cached}")
    return RunResult(folder.root, lifecycle.completed, lifecycle.failed, interrupted,
                     lifecycle.stopped)


def _start_session(prepared: Prepared, study: optuna.Study, *, finished: int, trials: int,
                   workers: int, worker: int, say: Callable[[str], None]) -> Callable[[str], None]:
    """Give the study its sampler (and, in the main process, record it and the budget) and
    say how the search runs; return the progress printer (a worker's lines carry its pid)."""
    config = prepared.config
    n_params, numeric_only = _describe_space(prepared.space)
    study.sampler, sampler_settings = make_sampler(config, finished=finished, n_params=n_params,
                                                   numeric_only=numeric_only, worker=worker)
    if workers > 1 or worker:  # the cores are shared: each worker trains on its share
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(workers, 1)))
    if worker:
        return _prefixed(say, f"[worker {os.getpid()}] ")
    study.set_user_attr(f"sampler_from_trial_{finished}", sampler_settings)
    study.set_user_attr("budget", trials)  # what `slimsearch status` counts against
    on = get_backend(config.search.backend).describe(workers)
    say(f"run folder: {prepared.folder.root} (sampler: {sampler_settings['sampler']}{on})")
    return say


def _set_up(prepared: Prepared, study: optuna.Study, device: torch.device, *, finished: int,
            worker: int, budget: int, say: Callable[[str], None]) -> TrialRunner:
    """Train (or load) the teacher and measure it, run the sensitivity pre-pass and, in a new
    study, enqueue the baselines and starting recipes (``seeded``); return the trial runner.
    Call it inside ``folder.setting_up()``, so it runs in one process at a time."""
    config, task, space, folder = prepared.config, prepared.task, prepared.space, prepared.folder
    with computing(device):
        teacher = prepare_teacher(task, config.train, seed=config.seed,
                                  cache_dir=folder.teacher, device=device)
    runner = TrialRunner(config=config, task=task, teacher=teacher, device=device,
                         latency_cache=LatencyCache(folder.root / "latency_cache.json"),
                         teacher_file=folder.teacher / MODEL_FILE,
                         structured_blocked=space.not_structured)
    if space.not_structured:
        first, why = next(iter(space.not_structured.items()))
        say(f"structured pruning cannot shrink {len(space.not_structured)} layers "
            f"({', '.join(space.not_structured)}); the search gives them the other methods. "
            f"{first}: {why}")
    metrics_file = folder.teacher / "metrics.json"
    # Measured once per run, at rest, on the same target and runtime as every trial: the
    # anchor every trial's latency ratio to the teacher is multiplied by (timing.paired).
    if teacher.trained_here or not metrics_file.exists():
        metrics = runner.measure(folder.teacher / MODEL_FILE, model=teacher.model,
                                 is_reference=True)
        metrics["val_majority_accuracy"] = chance_score(task.data("val"), task.metric)
        write_json(metrics_file, metrics)
    teacher_metrics = read_json(metrics_file)
    runner.teacher_metrics = teacher_metrics
    say(f"teacher ({'trained' if teacher.trained_here else 'cached'}): "
        f"{describe_metrics(teacher_metrics)}")
    if (warning := untrained_teacher(teacher_metrics)) is not None:
        say(f"WARNING: {warning}. Check train.lr = {config.train.lr:g} and train.teacher_epochs "
            f"= {config.train.teacher_epochs}, or the task's data and labels")
    starts = {}
    if config.search.sensitivity:  # workers read what the main process measured
        with computing(device):
            sensitivity = measure_sensitivity(teacher.model, task, space, device=device,
                                              path=folder.sensitivity, say=say)
        space.set_not_prunable(not_prunable(sensitivity))
        if config.space.layer_groups:
            space.set_groups(sensitivity_groups(sensitivity, config.space.layer_groups))
            members: dict[str, list[str]] = {}
            for layer, group in space.groups.items():
                members.setdefault(group, []).append(layer)
            say(f"{len(space.groups)} layers in {len(members)} groups of similar sensitivity, "
                "least sensitive first: " + "; ".join(
                    f"{group}: {len(names)} ({', '.join(names[:2])}"
                    f"{', ...' if len(names) > 2 else ''})"
                    for group, names in sorted(members.items(),
                                               key=lambda m: int(m[0].removeprefix("group")))))
        if config.space.layer_groups or space.not_prunable:  # fewer parameters: sampler again
            n_params, numeric_only = _describe_space(space)
            study.sampler, sampler_settings = make_sampler(
                config, finished=finished, n_params=n_params, numeric_only=numeric_only,
                worker=worker)
            if not worker:
                study.set_user_attr(f"sampler_from_trial_{finished}", sampler_settings)
        if config.search.starts:
            starts = starting_recipes(sensitivity, space)
    if not study.trials and not worker:
        for kind, name, recipe in seeded(space.baselines(), starts, budget=budget):
            study.enqueue_trial(space.params_of(recipe), user_attrs={kind: name})
    return runner


def seeded(baselines: dict[str, Recipe], starts: dict[str, Recipe], *,
           budget: int) -> list[tuple[str, str, Recipe]]:
    """The trials a new study starts with, as (user attribute, name, recipe): the teacher
    and uniform int8 (the first two baselines), then where the sensitivities point (the
    starts; one that is also a baseline runs as the baseline), then the other baselines
    (the recipes an expert tries first); at most half the ``budget`` (rounded up): the
    search keeps the other half."""
    first, rest = list(baselines.items())[:2], list(baselines.items())[2:]
    order = ([("baseline", n, r) for n, r in first]
             + [("start", n, r) for n, r in starts.items() if r not in baselines.values()]
             + [("baseline", n, r) for n, r in rest])
    return order[:math.ceil(budget / 2)]


def _prefixed(say: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda line: say(prefix + line)


def _describe_space(space: SearchSpace) -> tuple[int, bool]:
    """How many parameters one trial of ``space`` suggests, and whether all are numeric
    (a dry run on a throwaway study)."""
    dry = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0),
                              directions=[d for _, d in OBJECTIVES])
    trial = dry.ask()
    space.suggest(trial)
    kinds = [type(d) for d in trial.distributions.values()]
    return len(kinds), optuna.distributions.CategoricalDistribution not in kinds
