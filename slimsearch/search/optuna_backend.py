"""The run's Optuna multi-objective study, and the local backend that drives it with ask/tell
in this process (and its worker processes).

Everything is validated before anything is written: the task and its plug-in import, the
space against the task, the device, the storage URL, the Ray cluster when the backend is Ray,
and (for an existing run folder) that the experiment did not change. Then the teacher is
trained or loaded, measured like every trial, the two baselines are enqueued, and trials run
until the budget or the deadline: here, or on Ray (``ray_backend``), into the same study.
A failing trial is recorded FAIL with its error; the search goes on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from slimsearch.atomic import read_json, write_json, write_text
from slimsearch.compression import MODEL_FILE
from slimsearch.devices import computing, device_identity, free_memory, resolve_device
from slimsearch.errors import ConfigError, TrialStopped
from slimsearch.evaluators import LatencyCache, majority_accuracy, untrained_teacher
from slimsearch.experiment import ExperimentConfig
from slimsearch.runtimes import get_runtime
from slimsearch.search.objective import OBJECTIVES, TrialRunner, constraint_values, environment
from slimsearch.search.recovery import (
    OWNER,
    claimed,
    counted,
    enqueue_again,
    heartbeat,
    recover_stale_trials,
    registered_worker,
    run_lock,
    this_process,
)
from slimsearch.search.run_folder import RUN_FORMAT, RunFolder, experiment_copy
from slimsearch.search.samplers import make_sampler
from slimsearch.search.sensitivity import (
    SENSITIVITY_FILE,
    measure_sensitivity,
    not_prunable,
    sensitivity_groups,
    starting_recipes,
)
from slimsearch.search.storage import (
    JOURNAL_FILE,
    PASSWORD_ENV,
    check_storage_url,
    open_storage,
    public_url,
    shown,
)
from slimsearch.search.teacher import prepare_teacher
from slimsearch.spaces import SearchSpace
from slimsearch.tasks import Task, make_task

#: This many trials in a row failing with the same error stop the run: the cause is not the
#: recipe (they all differ) but something every trial shares, and the night would be wasted.
SAME_FAILURES_TO_STOP = 5


@dataclass(frozen=True)
class RunResult:
    """What one invocation of the search did."""

    run_dir: Path
    report: Path
    pareto_json: Path
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
    task = make_task(config.task, seed=config.seed, base_dir=config.base_dir)
    space = SearchSpace(task, config.space)
    task.check_labels()
    limit = config.constraints.max_size_bytes
    if limit is not None and limit < (smallest := space.min_weight_bytes()):
        raise ConfigError(
            f"constraints.max_size_bytes = {limit}: no model this space can produce is that "
            f"small; the weights alone of its smallest student, at {min(config.space.bits)} bits "
            f"and the highest sparsity, take {smallest} bytes. Raise the limit above that, or "
            "allow smaller students (space.student), fewer bits or more sparsity")
    device = resolve_device(config.target.device)
    get_runtime(config.target.runtime).check(config.target, device)
    if config.search.backend == "ray":  # before any training: the cluster must be usable
        from slimsearch.search import ray_backend

        ray_backend.connect(config.search.ray_address)
        ray_backend.check_resources(cpus_per_trial=config.search.cpus_per_trial or 1,
                                    gpus_per_trial=1 if device.type == "cuda" else 0)
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
    """Run (or continue) the search until ``trials`` trials exist or ``timeout_s`` passes.

    ``workers > 1``: once the teacher is ready, ``workers - 1`` more processes run trials on
    the same study, each with its share of the CPU threads for training (latency is still
    measured one at a time, under the device lock). ``worker`` (1, 2, ...): this process is
    one of those (it trains no teacher, enqueues nothing and leaves the report to the main
    process); its sampler is seeded apart from the others', or they would propose the same
    trials."""
    from slimsearch.report import write_report  # the report reads what this writes

    config, space, folder = prepared.config, prepared.space, prepared.folder
    deadline = time.monotonic() + timeout_s if timeout_s else math.inf
    device = resolve_device(config.target.device)
    copy = experiment_copy(experiment_file)  # a ConfigError here leaves nothing behind
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with folder.setting_up(say=say):
        study = _open_study(prepared, experiment_file, copy, device)
    finished = counted(study)
    n_params, numeric_only = _describe_space(space)
    study.sampler, sampler_settings = make_sampler(config, finished=finished, n_params=n_params,
                                                   numeric_only=numeric_only, worker=worker)
    if worker:
        say = _prefixed(say, f"[worker {os.getpid()}] ")
    else:
        study.set_user_attr(f"sampler_from_trial_{finished}", sampler_settings)
        study.set_user_attr("budget", trials)  # what `slimsearch status` counts against
        on = (f", Ray backend, {workers} trial{'s' if workers > 1 else ''} at once"
              if config.search.backend == "ray" else f", {workers} workers" if workers > 1 else "")
        say(f"run folder: {folder.root} (sampler: {sampler_settings['sampler']}{on})")
    if workers > 1 or worker:  # the cores are shared: each worker trains on its share
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(workers, 1)))
    children: list[subprocess.Popen] = []

    completed = failed = pruned = 0
    interrupted = False
    stopped: str | None = None
    failures_in_a_row: list[str] = []
    cache: LatencyCache | None = None
    ray_cached: tuple[int, int] | None = None
    with registered_worker(folder.root):  # so a later worker can tell we are alive
        try:
            recover_stale_trials(study, folder.root, say=say)
            # One process at a time trains the teacher, measures it and the sensitivities and
            # enqueues the first trials; the others then find them done.
            with folder.setting_up(say=say):
                runner = _set_up(prepared, study, device, finished=finished, worker=worker,
                                 say=say)
            cache = runner.latency_cache
            on_ray = config.search.backend == "ray"
            if workers > 1 and not worker and not on_ray:
                children = _start_workers(workers - 1, experiment_file, folder.root, trials,
                                          deadline, prepared.storage_url)
            if on_ray:  # the same study, the same trial runner, scheduled by Ray Tune
                from slimsearch.search import ray_backend

                tally = ray_backend.run_trials(study, space, folder, config, budget=trials,
                                               deadline=deadline, concurrency=workers,
                                               runner=runner, say=say)
                completed, failed, pruned, stopped = (tally.completed, tally.failed,
                                                      tally.pruned, tally.stopped)
                ray_cached = (tally.cached, tally.completed)
            while not on_ray and time.monotonic() < deadline:
                recover_stale_trials(study, folder.root, say=say)  # a worker may have died
                outcome = _one_trial(study, space, runner, folder, config, deadline=deadline,
                                     budget=trials, say=say)
                if outcome is None:  # the budget is claimed by finished and running trials
                    break
                state, error = outcome
                if state == TrialState.FAIL:  # its tensors went with its traceback
                    free_memory(device)
                completed += state == TrialState.COMPLETE
                failed += state == TrialState.FAIL
                pruned += state == TrialState.PRUNED
                failures_in_a_row = failures_in_a_row + [error_kind(error)] if error else []
                if (len(failures_in_a_row) >= SAME_FAILURES_TO_STOP
                        and len(set(failures_in_a_row[-SAME_FAILURES_TO_STOP:])) == 1):
                    stopped = same_failures_message(error, folder)
                    say(f"stopping: {stopped}")
                    break
            if time.monotonic() >= deadline:
                say("time budget reached: no new trial starts")
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: the running trial is recorded FAIL (not counted in the budget; it "
                "runs again when the search continues); finished trials are kept")
        finally:
            for child in children:  # on Ctrl-C they got the signal too, and stop the same way
                code = child.wait()
                if code == 1:  # its own lines above say which
                    say(f"worker process {child.pid} ended with exit code 1: it stopped on the "
                        "same error in several trials in a row, or crashed (see its lines "
                        "above); its running trial, if any, is recovered when the run continues")
                elif code not in (0, 130):
                    say(f"worker process {child.pid} ended with exit code {code}; its running "
                        "trial, if any, is recovered when the run continues")
            report = folder.report_html if worker else write_report(folder.root)
    cache_note = ""
    if ray_cached is not None and ray_cached[1]:  # the workers' caches, not this process's
        cache_note = (f"; latency cache: {ray_cached[0]} of {ray_cached[1]} completed trials "
                      f"reused a measurement ({ray_cached[0] / ray_cached[1]:.0%})")
    elif cache is not None and cache.hit_rate is not None:
        cache_note = (f"; latency cache: {cache.hits} of {cache.hits + cache.misses} "
                      f"measurements reused ({cache.hit_rate:.0%})")
    say(f"{completed} trials completed, {failed} failed, {pruned} stopped (time budget or early "
        f"stop) in this session{cache_note}; report: {report.resolve()}")
    return RunResult(folder.root, report, folder.pareto_json, completed, failed, interrupted,
                     stopped)


def _set_up(prepared: Prepared, study: optuna.Study, device: torch.device, *, finished: int,
            worker: int, say: Callable[[str], None]) -> TrialRunner:
    """Train (or load) the teacher and measure it, run the sensitivity pre-pass and, in a new
    study, enqueue the baselines and starting recipes; return the trial runner. Call it
    inside ``folder.setting_up()``, so it runs in one process at a time."""
    config, task, space, folder = prepared.config, prepared.task, prepared.space, prepared.folder
    with computing(device):
        teacher = prepare_teacher(task, config.train, seed=config.seed,
                                  cache_dir=folder.teacher, device=device)
    runner = TrialRunner(config=config, task=task, teacher=teacher, device=device,
                         latency_cache=LatencyCache(folder.root / "latency_cache.json"))
    metrics_file = folder.teacher / "metrics.json"
    # Measured once per run, on the same target and runtime as every trial: trials are
    # compared with one teacher measurement, not with whichever session ran last.
    if teacher.trained_here or not metrics_file.exists():
        metrics = runner.measure(folder.teacher / MODEL_FILE, model=teacher.model)
        metrics["val_majority_accuracy"] = majority_accuracy(task.val)
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
                                              path=folder.root / SENSITIVITY_FILE, say=say)
        space.set_not_prunable(not_prunable(sensitivity))
        if config.space.layer_groups:
            space.set_groups(sensitivity_groups(sensitivity, config.space.layer_groups))
            say(f"layers grouped by sensitivity: {space.groups}")
        if config.space.layer_groups or space.not_prunable:  # fewer parameters: sampler again
            n_params, numeric_only = _describe_space(space)
            study.sampler, sampler_settings = make_sampler(
                config, finished=finished, n_params=n_params, numeric_only=numeric_only,
                worker=worker)
            if not worker:
                study.set_user_attr(f"sampler_from_trial_{finished}", sampler_settings)
        starts = starting_recipes(sensitivity, space)
    if not study.trials and not worker:
        baselines = space.baselines()
        for name, recipe in baselines.items():
            study.enqueue_trial(space.params_of(recipe), user_attrs={"baseline": name})
        for name, recipe in starts.items():  # then where the sensitivities point
            if recipe not in baselines.values():
                study.enqueue_trial(space.params_of(recipe), user_attrs={"start": name})
    return runner


def _one_trial(study: optuna.Study, space: SearchSpace, runner: TrialRunner, folder: RunFolder,
               config: ExperimentConfig, *, deadline: float, budget: int,
               say: Callable[[str], None]) -> tuple[TrialState, str | None] | None:
    """Run one trial and return its state and error (FAIL only), or None when the budget is
    already claimed."""
    with run_lock(folder.root):  # check and claim at once, or two workers could both start
        taken = claimed(study)
        if taken >= budget:
            return None
        with warnings.catch_warnings():  # "heartbeat is meant for optimize": we run it (below)
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        trial.set_user_attr(OWNER, this_process())  # first: a killed worker is found by it
    position = f"{taken + 1}/{budget}"
    trial_dir = folder.trial(trial.number)
    seed = config.seed + trial.number
    trial.set_user_attr("seed", seed)
    start = time.perf_counter()
    with heartbeat(study, trial):  # RDB storages: tells other hosts this trial is alive
        try:
            try:
                recipe = space.suggest(trial)
                trial.set_user_attr("recipe", recipe.to_dict())
                metrics = runner(recipe, trial_dir, seed=seed,
                                 deadline=deadline if math.isfinite(deadline) else None)
                violations = constraint_values(metrics, runner.teacher_metrics, config.constraints)
                for name, value in violations.items():
                    trial.set_constraint(name, value)
                metrics["feasible"] = all(v <= 0 for v in violations.values())
                trial.set_user_attr("metrics", metrics)
                study.tell(trial, [metrics[name] for name, _ in OBJECTIVES])
            except TrialStopped as exc:
                trial.set_user_attr("stopped", str(exc))
                if exc.by_deadline:  # not the recipe's fault: it runs again when the search continues
                    trial.set_user_attr("interrupted", True)
                    enqueue_again(study, trial)
                study.tell(trial, state=TrialState.PRUNED)
                say(f"[{position}] trial {trial.number} PRUNED after {time.perf_counter() - start:.1f} "
                    f"s: {exc}")
                return TrialState.PRUNED, None
            except (Exception, KeyboardInterrupt) as exc:
                message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                trial.set_user_attr("error", message)
                write_text(trial_dir / "error.txt", traceback.format_exc())
                if isinstance(exc, KeyboardInterrupt):  # not the trial's fault: it runs again later
                    trial.set_user_attr("interrupted", True)
                    enqueue_again(study, trial)
                study.tell(trial, state=TrialState.FAIL)
                say(f"[{position}] trial {trial.number} FAILED after {time.perf_counter() - start:.1f} s: "
                    f"{message}")
                if isinstance(exc, KeyboardInterrupt):
                    raise
                return TrialState.FAIL, message
        except UpdateFinishedTrialError:
            # Another worker recorded this trial FAIL and enqueued its parameters again while
            # it ran here: its heartbeat went missing for longer than the storage's grace
            # period (a stalled database connection or process). The retry owns it now.
            say(f"[{position}] trial {trial.number} was recovered by another worker while it "
                "ran here (its heartbeat was missed); this result is dropped, the retry counts")
            return TrialState.FAIL, None
    say(done_line(study, trial.number, metrics, seconds=time.perf_counter() - start,
                  position=position))
    return TrialState.COMPLETE, None


def done_line(study: optuna.Study, number: int, metrics: dict, *, seconds: float,
              position: str) -> str:
    """The progress line of a completed trial: its figures and the front so far."""
    front = study.best_trials  # feasible trials only, when there are constraints
    best = max((t.values[0] for t in front), default=None)
    speed = f"{metrics['speedup']:.2f}x" if "speedup" in metrics else "?"
    slower = " SLOWER THAN TEACHER" if metrics.get("slower_than_teacher") else ""
    infeasible = "" if metrics["feasible"] else " INFEASIBLE"
    best_text = f"best val_accuracy {best:.4f}" if front else "no feasible trial yet"
    return (f"[{position}] trial {number} done in {seconds:.1f} s: "
            f"{describe_metrics(metrics)} ({metrics['size_ratio']:.1f}x smaller, {speed} speed"
            f"{slower}){infeasible} | Pareto front {len(front)}, {best_text}")


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


def _prefixed(say: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda line: say(prefix + line)


def _start_workers(count: int, experiment_file: Path, run_dir: Path, trials: int,
                   deadline: float, storage: str | None) -> list[subprocess.Popen]:
    """``count`` more processes of ``slimsearch run`` on this run folder, as workers."""
    # --backend local: workers exist only on the local backend, whatever the file says
    command = [sys.executable, "-m", "slimsearch", "run", str(experiment_file), "--run-dir",
               str(run_dir), "--trials", str(trials), "--workers", str(count + 1),
               "--backend", "local"]
    if math.isfinite(deadline):
        command += ["--timeout", f"{max(1.0, deadline - time.monotonic()):.0f}s"]
    if storage is not None:
        command += ["--storage", storage]
    return [subprocess.Popen(command + ["--as-worker", str(index)]) for index in range(1, count + 1)]


def _describe_space(space: SearchSpace) -> tuple[int, bool]:
    """How many parameters one trial of ``space`` suggests, and whether all are numeric
    (a dry run on a throwaway study)."""
    dry = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0),
                              directions=[d for _, d in OBJECTIVES])
    trial = dry.ask()
    space.suggest(trial)
    kinds = [type(d) for d in trial.distributions.values()]
    return len(kinds), optuna.distributions.CategoricalDistribution not in kinds


def describe_metrics(metrics: dict) -> str:
    notes = ", cached" if metrics.get("latency_cached") else ""
    notes += ", scaled: machine busy" if metrics.get("latency_disturbed") else ""
    return (f"val_accuracy {metrics['val_accuracy']:.4f}, {metrics['size_bytes'] / 1e3:.1f} kB, "
            f"{metrics['latency_ms']:.4f} ms (cv {metrics['latency_cv']:.2f}{notes})")
