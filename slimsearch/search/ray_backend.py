"""The Ray Tune backend: the same trials as the local backend, run on a Ray cluster, told to
the same Optuna study.

Ray Tune schedules; the study stays the one record. ``StudySearcher`` (a Tune ``Searcher``)
asks the study for each trial on the driver, under the same budget claim as local workers,
and tells it the outcome: COMPLETE only with the trial's full figures, PRUNED when it was
stopped (by its deadline, early stopping, or by Tune before it reported), FAIL with the
error. Ray's own ``OptunaSearch`` does not fit: it records trials Tune stopped early as
COMPLETE with partial metrics, cannot pass constraints, and re-enqueues its starting points
whenever a Tuner is rebuilt. So ``status``, ``report``, ``pick``, ``export`` and ``resume``
read a Ray trial like any other, and a study may mix both backends.

The trial itself (``run_trial``, in a Ray worker process) is the engine-free
``TrialRunner`` of the local backend. It reads the run folder (the teacher, the experiment)
and writes the trial's files into it, so every node must see the run folder at the same path:
a one-machine cluster does; on several machines, put it on a filesystem they all mount.
Latency is measured under the same per-machine device lock as local workers.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from slimsearch.errors import ConfigError, TrialStopped

INSTALL = 'pip install "slimsearch[ray]"'
#: The key of a Ray trial's one result: its outcome as JSON (Tune flattens nested results).
OUTCOME = "slimsearch_outcome"
#: Tune's own time budget ends this long after the run's deadline: trials stop themselves at
#: the deadline (between epochs); this only catches one that could not (seconds).
DEADLINE_GRACE_S = 60.0
#: Times Ray restarts a trial whose worker process died (a lost node, a killed process).
MAX_RETRIES = 1


def require_ray() -> None:
    """Raise ``ConfigError`` with the install command when Ray Tune is not installed."""
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--backend ray needs Ray Tune, which is not installed ({exc}); "
                          f"install it with: {INSTALL}") from exc


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` ("auto": the one this machine belongs to, or
    "host:port"), or with None start Ray on this machine. ``ConfigError`` when it cannot."""
    if address not in (None, "auto"):
        _check_reachable(address)
    if address is not None and "RAY_AUTH_MODE" not in os.environ and _token_available():
        # A cluster from `ray start --head` checks a token, which a client sends only in
        # token mode (Ray 2.60 does not switch to it by itself when joining an address, and
        # reads the mode when it is imported: so before the import). RAY_AUTH_MODE=disabled
        # opts out.
        os.environ["RAY_AUTH_MODE"] = "token"
    require_ray()
    import ray

    if ray.is_initialized():
        return
    try:
        if address is None:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise ConfigError(f"--ray-address {address}: could not join a Ray cluster there ({exc})"
                          ". If Ray's log above says the authentication token is missing or "
                          "incorrect, give this machine the head's token (RAY_AUTH_TOKEN, or the "
                          "file ~/.ray/auth_token); if there is no cluster, start one with `ray "
                          "start --head`, or leave --ray-address out to run Ray on this machine "
                          "alone") from exc
    except Exception as exc:  # Ray's authentication error and friends: say it plainly
        if type(exc).__name__ == "AuthenticationError":
            raise ConfigError(f"--ray-address {address}: the cluster refused this client's "
                              f"token: {exc}") from exc
        raise


def _token_available() -> bool:
    """Whether this machine holds a Ray cluster token where Ray looks for one."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", str(Path.home() / ".ray" / "auth_token"))
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).is_file()


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's own retries, when nothing listens at host:port."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: give auto or host:port, e.g. "
                          "10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"--ray-address {address}: cannot reach it ({exc}); check the "
                          "address `ray start --head` printed and that this machine can reach "
                          "it") from exc


def check_resources(*, cpus_per_trial: int, gpus_per_trial: int) -> None:
    """Refuse a trial the cluster could never schedule (it would wait forever)."""
    import ray

    total = ray.cluster_resources()
    if gpus_per_trial and total.get("GPU", 0) < gpus_per_trial:
        raise ConfigError(f"target.device asks for a GPU per trial, but the Ray cluster has "
                          f"{total.get('GPU', 0):g} GPUs; add a GPU node or set target.device "
                          "= \"cpu\"")
    if total.get("CPU", 0) < cpus_per_trial:
        raise ConfigError(f"search.cpus_per_trial = {cpus_per_trial}, but the Ray cluster has "
                          f"{total.get('CPU', 0):g} CPUs; lower it")


# -- in the Ray worker -------------------------------------------------------------------

_RUNNERS: dict[str, Any] = {}


def _runner(run_dir: str) -> Any:
    """The run's ``TrialRunner``, built once per worker process (Tune reuses the process)."""
    if run_dir not in _RUNNERS:
        from slimsearch.atomic import read_json
        from slimsearch.devices import resolve_device
        from slimsearch.evaluators import LatencyCache
        from slimsearch.search.objective import TrialRunner
        from slimsearch.search.run_folder import RunFolder
        from slimsearch.search.teacher import prepare_teacher
        from slimsearch.tasks import make_task

        folder = RunFolder(Path(run_dir))
        if not (folder.teacher / "metrics.json").exists():
            raise RuntimeError(f"the run folder {run_dir} is not visible on {socket.gethostname()}"
                               ": put it on a filesystem every Ray node mounts at the same path")
        config = folder.config()
        task = make_task(config.task, seed=config.seed, base_dir=config.base_dir)
        device = resolve_device(config.target.device)
        teacher = prepare_teacher(task, config.train, seed=config.seed, cache_dir=folder.teacher,
                                  device=device)  # cached by the driver: loads, never trains
        runner = TrialRunner(config=config, task=task, teacher=teacher, device=device,
                             latency_cache=LatencyCache(folder.root / "latency_cache.json"))
        runner.teacher_metrics = read_json(folder.teacher / "metrics.json")
        _RUNNERS[run_dir] = runner
    return _RUNNERS[run_dir]


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """Build and measure one trial from the searcher's ``spec``; return its outcome (never
    raises for the trial's own failures: those are outcomes too)."""
    import torch

    from slimsearch.atomic import write_text
    from slimsearch.devices import free_memory
    from slimsearch.search.run_folder import RunFolder
    from slimsearch.spaces import Recipe

    torch.set_num_threads(spec["threads"])
    trial_dir = RunFolder(Path(spec["run_dir"])).trial(spec["number"])
    deadline = (None if spec["deadline_unix"] is None
                else time.monotonic() + spec["deadline_unix"] - time.time())
    runner = None
    try:
        runner = _runner(spec["run_dir"])
        metrics = runner(Recipe.from_dict(spec["recipe"]), trial_dir, seed=spec["seed"],
                         deadline=deadline)
        return {"state": "COMPLETE", "metrics": metrics}
    except TrialStopped as exc:
        return {"state": "PRUNED", "stopped": str(exc), "by_deadline": exc.by_deadline}
    except Exception as exc:
        write_text(trial_dir / "error.txt", traceback.format_exc())
        if runner is not None:
            free_memory(runner.device)
        return {"state": "FAIL", "error": f"{type(exc).__name__}: {exc}" if str(exc)
                else type(exc).__name__}


def _trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial under run/ray/: named after the study's trial number (Tune's
    default name spells out the whole recipe)."""
    return f"trial-{trial.config['number']:05d}"


def _trainable(spec: dict[str, Any]) -> None:
    from ray import tune

    tune.report({OUTCOME: json.dumps(run_trial(spec))})


# -- on the driver -----------------------------------------------------------------------

@dataclass
class Tally:
    """What this session's Ray trials did."""

    completed: int = 0
    #: Completed trials whose latency came from the run's latency cache.
    cached: int = 0
    failed: int = 0
    pruned: int = 0
    stopped: str | None = None


def _searcher_class() -> type:
    from ray.tune.search import Searcher

    from slimsearch.search.objective import OBJECTIVES, constraint_values
    from slimsearch.search.optuna_backend import (
        SAME_FAILURES_TO_STOP,
        done_line,
        error_kind,
        same_failures_message,
    )
    from slimsearch.search.recovery import (
        OWNER,
        claimed,
        enqueue_again,
        heartbeat,
        run_lock,
        this_process,
    )

    class StudySearcher(Searcher):
        """Trials asked of and told to the run's Optuna study (see the module docstring)."""

        def __init__(self, study: optuna.Study, space: Any, folder: Any, config: Any, *,
                     budget: int, deadline_unix: float | None, threads: int,
                     teacher_metrics: dict[str, Any], say: Callable[[str], None]) -> None:
            super().__init__()
            self.study, self.space, self.folder, self.config = study, space, folder, config
            self.budget, self.deadline_unix, self.threads = budget, deadline_unix, threads
            self.teacher_metrics, self.say = teacher_metrics, say
            #: Tune trial id -> (Optuna trial, start, "n/budget", its heartbeat's context)
            self.pending: dict[str, tuple[optuna.Trial, float, str, Any]] = {}
            self.tally = Tally()
            self.failures_in_a_row: list[str] = []
            self.budget_claimed = False  # until a trial ends: no need to read the study again

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its search algorithm into the experiment folder (for a
            # Tuner.restore that slimsearch does not use: the study is the state). The study,
            # the space with its task's data and the printer stay out of that file.
            return {k: v for k, v in self.__dict__.items()
                    if k not in ("study", "space", "say", "pending")}

        def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
            return True  # the objectives and the space are the study's, not Tune's

        def suggest(self, trial_id: str) -> dict | str | None:
            out_of_time = self.deadline_unix is not None and time.time() >= self.deadline_unix
            if out_of_time or self.tally.stopped:
                return None if self.pending else Searcher.FINISHED
            if self.budget_claimed and self.pending:  # Tune asks ~10 times a second
                return None
            with run_lock(self.folder.root):  # the same claim as local workers make
                taken = claimed(self.study)
                if taken >= self.budget:  # a running one may yet be re-enqueued: ask later
                    self.budget_claimed = True
                    return None if self.pending else Searcher.FINISHED
                trial = self.study.ask()
                trial.set_user_attr(OWNER, this_process())  # the driver: it tells the study
            beat = heartbeat(self.study, trial)  # RDB storages: other hosts see it alive
            beat.__enter__()
            trial.set_user_attr("backend", "ray")
            seed = self.config.seed + trial.number
            trial.set_user_attr("seed", seed)
            recipe = self.space.suggest(trial)
            trial.set_user_attr("recipe", recipe.to_dict())
            self.pending[trial_id] = (trial, time.perf_counter(), f"{taken + 1}/{self.budget}",
                                      beat)
            return {"run_dir": str(self.folder.root), "number": trial.number,
                    "recipe": recipe.to_dict(), "seed": seed, "threads": self.threads,
                    "deadline_unix": self.deadline_unix}

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            if trial_id not in self.pending:
                return
            trial, start, position, beat = self.pending.pop(trial_id)
            beat.__exit__(None, None, None)
            self.budget_claimed = False  # it may have been re-enqueued, or not counted
            outcome = json.loads(result[OUTCOME]) if result and OUTCOME in result else None
            seconds = time.perf_counter() - start
            try:
                self._tell(trial, outcome, error, seconds, position)
            except (UpdateFinishedTrialError, ValueError):  # recovered elsewhere meanwhile
                self.say(f"[{position}] trial {trial.number} was recovered by another worker "
                         "while it ran on Ray; this result is dropped, the retry counts")

        def _tell(self, trial: optuna.Trial, outcome: dict | None, error: bool, seconds: float,
                  position: str) -> None:
            if outcome is None and error:
                # Its worker process died, again after Ray's retry: most likely this recipe
                # (out of memory, a crash in native code). Counted, like any failure.
                outcome = {"state": "FAIL", "error": f"its Ray worker died {MAX_RETRIES + 1} "
                           "times (out of memory? a crash in native code? see Ray's logs)"}
            elif outcome is None:  # stopped by Tune before it reported: not its result
                outcome = {"state": "PRUNED", "by_deadline": True,
                           "stopped": "Ray Tune stopped it before it finished"}
            if outcome["state"] == "COMPLETE":
                metrics = outcome["metrics"]
                violations = constraint_values(metrics, self.teacher_metrics,
                                               self.config.constraints)
                for name, value in violations.items():
                    trial.set_constraint(name, value)
                metrics["feasible"] = all(v <= 0 for v in violations.values())
                trial.set_user_attr("metrics", metrics)
                self.study.tell(trial, [metrics[name] for name, _ in OBJECTIVES])
                self.tally.completed += 1
                self.tally.cached += bool(metrics.get("latency_cached"))
                self.failures_in_a_row = []
                self.say(done_line(self.study, trial.number, metrics, seconds=seconds,
                                   position=position))
            elif outcome["state"] == "PRUNED":
                trial.set_user_attr("stopped", outcome["stopped"])
                if outcome["by_deadline"]:  # not the recipe's fault: it runs again later
                    trial.set_user_attr("interrupted", True)
                    enqueue_again(self.study, trial)
                self.study.tell(trial, state=TrialState.PRUNED)
                self.tally.pruned += 1
                self.say(f"[{position}] trial {trial.number} PRUNED after {seconds:.1f} s: "
                         f"{outcome['stopped']}")
            else:
                trial.set_user_attr("error", outcome["error"])
                self.study.tell(trial, state=TrialState.FAIL)
                self.tally.failed += 1
                self.say(f"[{position}] trial {trial.number} FAILED after {seconds:.1f} s: "
                         f"{outcome['error']}")
                self.failures_in_a_row.append(error_kind(outcome["error"]))
                last = self.failures_in_a_row[-SAME_FAILURES_TO_STOP:]
                if len(last) == SAME_FAILURES_TO_STOP and len(set(last)) == 1:
                    self.tally.stopped = same_failures_message(outcome["error"], self.folder)
                    self.say(f"stopping: {self.tally.stopped}")

        def abandon_pending(self) -> None:
            """Trials Tune never reported back (it stops the running ones at its time budget
            without telling the searcher; or the run was interrupted): PRUNED by the time
            budget, else FAIL; not counted either way, and their parameters run again."""
            out_of_time = self.deadline_unix is not None and time.time() >= self.deadline_unix
            for trial, start, position, beat in self.pending.values():
                beat.__exit__(None, None, None)
                try:
                    trial.set_user_attr("interrupted", True)
                    if out_of_time:
                        trial.set_user_attr("stopped", "the run's time budget ended while it ran")
                        self.study.tell(trial, state=TrialState.PRUNED)
                        self.tally.pruned += 1
                    else:
                        trial.set_user_attr("error", "the Ray run ended while the trial ran")
                        self.study.tell(trial, state=TrialState.FAIL)
                        self.tally.failed += 1
                    enqueue_again(self.study, trial)
                except (UpdateFinishedTrialError, ValueError):
                    continue
                self.say(f"[{position}] trial {trial.number} "
                         f"{'PRUNED' if out_of_time else 'FAILED'} after "
                         f"{time.perf_counter() - start:.1f} s: "
                         f"{trial.user_attrs.get('stopped') or trial.user_attrs.get('error')} "
                         "(it runs again when the search continues)")
            self.pending.clear()

        def save(self, checkpoint_path: str) -> None:
            """Nothing to save: the study is the state (Tune calls this after each trial)."""

        def restore(self, checkpoint_path: str) -> None:
            """Nothing to restore: a resumed run starts a new Tuner on the same study."""

    return StudySearcher


def _cpus_each(concurrency: int) -> int:
    """The cluster's CPUs shared by ``concurrency`` trials, at most one node's (a trial runs
    on one node): on one machine, what each local worker would get."""
    import ray

    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = sum(nodes)
    return max(1, min(int(total // max(concurrency, 1)), int(max(nodes, default=1))))


def run_trials(study: optuna.Study, space: Any, folder: Any, config: Any, *, budget: int,
               deadline: float, concurrency: int, runner: Any,
               say: Callable[[str], None]) -> Tally:
    """Run trials on the connected Ray cluster until the budget is claimed, the deadline
    (``time.monotonic()``) passes or the same error stops the run; ``concurrency`` trials at
    once, each with ``search.cpus_per_trial`` CPUs and, on CUDA, one whole GPU (two trials on
    one GPU would corrupt each other's latency)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our progress lines, not Tune's tables
    # Ctrl-C interrupts the run as on the local backend (Tune's own handler would end fit()
    # as if the search were done, and the command would exit 0)
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    remaining = deadline - time.monotonic()
    deadline_unix = time.time() + remaining if math.isfinite(remaining) else None
    cpus = config.search.cpus_per_trial or _cpus_each(concurrency)
    gpus = 1 if runner.device.type == "cuda" else 0
    searcher = _searcher_class()(study, space, folder, config, budget=budget,
                                 deadline_unix=deadline_unix, threads=cpus,
                                 teacher_metrics=runner.teacher_metrics, say=say)
    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": cpus, "gpu": gpus}),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
            num_samples=-1, reuse_actors=True, trial_dirname_creator=_trial_dirname,
            time_budget_s=remaining + DEADLINE_GRACE_S if math.isfinite(remaining) else None),
        run_config=tune.RunConfig(
            name="tune", storage_path=str((folder.root / "ray").resolve()), verbose=0,
            failure_config=tune.FailureConfig(max_failures=MAX_RETRIES)))
    try:
        tuner.fit()
    finally:
        searcher.abandon_pending()
    return searcher.tally
