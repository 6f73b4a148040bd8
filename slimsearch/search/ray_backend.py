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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimsearch.errors import ConfigError

if TYPE_CHECKING:  # a Ray worker imports this module for run_trial: it stays light
    import torch

    from slimsearch.experiment import ExperimentConfig
    from slimsearch.search.lifecycle import Dispatch, TrialLifecycle
    from slimsearch.search.objective import TrialRunner

INSTALL = 'pip install "slimsearch[ray]"'
#: Tune's own time budget ends this long after the run's deadline: trials stop themselves at
#: the deadline (between epochs); this only catches one that could not (seconds).
DEADLINE_GRACE_S = 60.0


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

_RUNNERS: dict[str, TrialRunner] = {}


def _runner(run_dir: str, make_runner: Callable[[], TrialRunner]) -> TrialRunner:
    """The run's ``TrialRunner``, built once per worker process (Tune reuses the process)."""
    if run_dir not in _RUNNERS:
        _RUNNERS[run_dir] = make_runner()
    return _RUNNERS[run_dir]


def run_trial(spec: dict[str, Any], make_runner: Callable[[], TrialRunner]) -> dict[str, Any]:
    """Build and measure one trial from the searcher's ``spec`` with the runner
    ``make_runner`` builds; return its outcome as plain data (never raises for the trial's own
    failures: those are outcomes too)."""
    import torch

    from slimsearch.run import RunFolder
    from slimsearch.search.lifecycle import Outcome, execute, failure
    from slimsearch.spaces import Recipe

    torch.set_num_threads(spec["threads"])
    trial_dir = RunFolder(Path(spec["run_dir"])).trial(spec["number"])
    deadline = (None if spec["deadline_unix"] is None
                else time.monotonic() + spec["deadline_unix"] - time.time())
    try:  # the run folder, the teacher or the recipe cannot be read on this node
        runner = _runner(spec["run_dir"], make_runner)
        recipe = Recipe.from_dict(spec["recipe"])
    except Exception as exc:
        return Outcome("FAIL", error=failure(exc, trial_dir)).to_dict()
    return execute(runner, recipe, trial_dir, seed=spec["seed"], deadline=deadline).to_dict()


def _trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial under run/ray/: named after the study's trial number (Tune's
    default name spells out the whole recipe)."""
    return f"trial-{trial.config['number']:05d}"


def _trainable(spec: dict[str, Any], make_runner: Callable[[], TrialRunner]) -> None:
    from ray import tune

    from slimsearch.search.ray_searcher import OUTCOME

    tune.report({OUTCOME: json.dumps(run_trial(spec, make_runner))})


# -- on the driver -----------------------------------------------------------------------

def _cpus_each(concurrency: int) -> int:
    """The cluster's CPUs shared by ``concurrency`` trials, at most one node's (a trial runs
    on one node): on one machine, what each local worker would get."""
    import ray

    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = sum(nodes)
    return max(1, min(int(total // max(concurrency, 1)), int(max(nodes, default=1))))


class RayBackend:
    """Trials on a Ray cluster (``search.ray_address``, or Ray started on this machine)."""

    name = "ray"

    def check(self, config: ExperimentConfig, device: torch.device) -> None:
        connect(config.search.ray_address)  # before any training: the cluster must be usable
        check_resources(cpus_per_trial=config.search.cpus_per_trial or 1,
                        gpus_per_trial=1 if device.type == "cuda" else 0)

    def describe(self, workers: int) -> str:
        return f", Ray backend, {workers} trial{'s' if workers > 1 else ''} at once"

    def run(self, dispatch: Dispatch) -> None:
        run_trials(dispatch.lifecycle, dispatch.make_runner, device=dispatch.runner.device,
                   deadline=dispatch.deadline, concurrency=dispatch.workers)


def run_trials(lifecycle: TrialLifecycle, make_runner: Callable[[], TrialRunner], *,
               device: torch.device, deadline: float, concurrency: int) -> None:
    """Run trials on the connected Ray cluster until the budget is claimed, the deadline
    (``time.monotonic()``) passes or the same error stops the run; ``concurrency`` trials at
    once, each with ``search.cpus_per_trial`` CPUs and, on CUDA (``device``), one whole GPU
    (two trials on one GPU would corrupt each other's latency). ``lifecycle`` starts and
    finishes each trial on this driver, as the local backend's does; a Ray worker runs it
    (``run_trial``) with the runner ``make_runner`` builds there."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our progress lines, not Tune's tables
    # Ctrl-C interrupts the run as on the local backend (Tune's own handler would end fit()
    # as if the search were done, and the command would exit 0)
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from slimsearch.search.ray_searcher import MAX_RETRIES, StudySearcher

    remaining = deadline - time.monotonic()
    deadline_unix = time.time() + remaining if math.isfinite(remaining) else None
    cpus = lifecycle.config.search.cpus_per_trial or _cpus_each(concurrency)
    gpus = 1 if device.type == "cuda" else 0
    searcher = StudySearcher(lifecycle, deadline_unix=deadline_unix, threads=cpus)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trainable, make_runner=make_runner),
                            {"cpu": cpus, "gpu": gpus}),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
            num_samples=-1, reuse_actors=True, trial_dirname_creator=_trial_dirname,
            time_budget_s=remaining + DEADLINE_GRACE_S if math.isfinite(remaining) else None),
        run_config=tune.RunConfig(
            name="tune", storage_path=str((lifecycle.folder.root / "ray").resolve()), verbose=0,
            failure_config=tune.FailureConfig(max_failures=MAX_RETRIES)))
    try:
        tuner.fit()
    finally:
        searcher.abandon_pending()
