"""The local backend: trials run in this process, and with ``--workers N`` in N - 1 more
processes of ``slimsearch run`` on the same run folder and study. Each trial goes through the
trial lifecycle (``lifecycle``) like a Ray trial does; only the dispatch differs."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from slimsearch.errors import ConfigError
from slimsearch.experiment import ExperimentConfig
from slimsearch.search.lifecycle import (
    Dispatch,
    Outcome,
    Started,
    TrialLifecycle,
    execute,
    failure,
)
from slimsearch.search.objective import TrialRunner
from slimsearch.search.recovery import recover_stale_trials
from slimsearch.spaces import Recipe


class LocalBackend:
    """Trials in this process and, with ``--workers N``, in N - 1 more on this machine."""

    name = "local"

    def check(self, config: ExperimentConfig, device: torch.device) -> None:
        if config.search.ray_address is not None:
            raise ConfigError(f"search.ray_address = {config.search.ray_address!r} is only used "
                              "with search.backend = \"ray\", but search.backend = \"local\"; "
                              "set search.backend = \"ray\" too, or remove ray_address")

    def describe(self, workers: int) -> str:
        return f", {workers} workers" if workers > 1 else ""

    def run(self, dispatch: Dispatch) -> None:
        children = []
        try:
            if dispatch.workers > 1 and not dispatch.worker:
                children = start_workers(dispatch.workers - 1, dispatch.experiment_file,
                                         dispatch.lifecycle.folder.root,
                                         dispatch.lifecycle.budget, dispatch.deadline,
                                         dispatch.storage_url)
            run_local(dispatch.lifecycle, dispatch.runner, deadline=dispatch.deadline)
        finally:
            wait_for_workers(children, dispatch.lifecycle.say)


def run_local(lifecycle: TrialLifecycle, runner: TrialRunner, *, deadline: float) -> None:
    """Run trials here until the budget is claimed (by every worker's trials), the deadline
    (``time.monotonic()``) passes or the run stops on the same error. On Ctrl-C the running
    trial is told FAIL (interrupted: not counted, it runs again) and KeyboardInterrupt goes on."""
    while time.monotonic() < deadline and lifecycle.stopped is None:
        recover_stale_trials(lifecycle.study, lifecycle.folder.root, say=lifecycle.say)
        started = lifecycle.start()
        if started is None:
            return
        if started.answered is not None:  # drawing it failed, or a finished trial's recipe
            lifecycle.finish(started, started.answered)
        else:
            lifecycle.finish(started, _run(lifecycle, runner, started, started.recipe, deadline))


def _run(lifecycle: TrialLifecycle, runner: TrialRunner, started: Started, recipe: Recipe,
         deadline: float) -> Outcome:
    trial_dir = lifecycle.folder.trial(started.number)
    try:
        return execute(runner, recipe, trial_dir, seed=started.seed,
                       deadline=deadline if math.isfinite(deadline) else None)
    except KeyboardInterrupt as exc:  # not the trial's fault: it runs again when it continues
        lifecycle.finish(started, Outcome("FAIL", error=failure(exc, trial_dir),
                                          interrupted=True))
        raise


def start_workers(count: int, experiment_file: Path, run_dir: Path, trials: int,
                  deadline: float, storage: str | None) -> list[subprocess.Popen]:
    """``count`` more processes of ``slimsearch run`` on this run folder, as workers. The
    storage URL goes without its password; they inherit it in their environment."""
    # --backend local: workers exist only on the local backend, whatever the file says
    command = [sys.executable, "-m", "slimsearch", "run", str(experiment_file), "--run-dir",
               str(run_dir), "--trials", str(trials), "--workers", str(count + 1),
               "--backend", "local"]
    if math.isfinite(deadline):
        command += ["--timeout", f"{max(1.0, deadline - time.monotonic()):.0f}s"]
    if storage is not None:
        command += ["--storage", storage]
    return [subprocess.Popen(command + ["--as-worker", str(index)]) for index in range(1, count + 1)]


def wait_for_workers(children: list[subprocess.Popen], say: Callable[[str], None]) -> None:
    """Wait for the worker processes (after Ctrl-C they got the signal too, and stop the same
    way) and say which ended badly."""
    for child in children:
        code = child.wait()
        if code == 1:  # its own lines above say which
            say(f"worker process {child.pid} ended with exit code 1: it stopped on the same "
                "error in several trials in a row, or crashed (see its lines above); its "
                "running trial, if any, is recovered when the run continues")
        elif code not in (0, 130):
            say(f"worker process {child.pid} ended with exit code {code}; its running trial, "
                "if any, is recovered when the run continues")
