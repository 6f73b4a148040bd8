"""Trials a dead worker left RUNNING, found and put right.

Optuna's journal file has no heartbeat: a worker killed with SIGKILL, by the OOM killer or a
power cut leaves its trial RUNNING forever. So every trial records its owner (host, process
id and the process's start time, so a reused pid is not mistaken for the owner) as soon as it
is asked for, and every worker registers itself in the run folder while it runs. When a worker
starts, a RUNNING trial is stale when its owner on this host is gone (or, for the rare trial
killed before it could record an owner, when no other worker of this run is alive). A stale
trial is marked FAIL and ``interrupted`` (it does not count toward the budget) and its
parameters are enqueued again, once.

RDB storages (PostgreSQL for searches that span machines) also have Optuna's heartbeat: a
worker records one for its running trial every minute (``heartbeat``), and a trial whose
owner cannot be checked from here (another host) is stale when its heartbeat stopped.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError

# Optuna's own heartbeat thread and stale-trial query, the ones study.optimize uses (not
# exported: Optuna runs them for study.optimize, and we drive trials with ask/tell).
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread
from optuna.trial import TrialState

from slimsearch.atomic import read_json, write_json
from slimsearch.locks import file_lock

OWNER = "owner"
RETRY_OF = "retry_of"


def _process_start(pid: int) -> int | None:
    """Clock ticks after boot at which process ``pid`` started (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name may hold spaces


def this_process() -> dict[str, Any]:
    """The owner record of the calling process."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "process_start": _process_start(os.getpid())}


def is_alive(owner: dict[str, Any]) -> bool | None:
    """True/False for an owner on this host; None when it cannot be told (another host, or
    no /proc to read process start times from): such trials are left alone."""
    if owner.get("host") != socket.gethostname() or owner.get("process_start") is None:
        return None
    start = _process_start(int(owner["pid"]))
    return start is not None and start == owner.get("process_start")


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Optuna's heartbeat for ``trial`` while the block runs, where the storage has one."""
    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield


def _stale_by_heartbeat(study: optuna.Study) -> set[int]:
    """Trial ids whose heartbeat stopped longer ago than the grace period (RDB storages)."""
    storage = study._storage
    if not isinstance(storage, BaseHeartbeat) or storage.get_heartbeat_interval() is None:
        return set()
    return set(storage._get_stale_trial_ids(study._study_id))


def enqueue_again(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial) -> None:
    """Run an interrupted trial's parameters once more (a retry's are not: once is enough);
    a baseline stays a baseline, a starting recipe or a refinement stays what it was, and it
    trains with the same seed: the same build, run again."""
    if RETRY_OF in trial.user_attrs:
        return
    attrs = {RETRY_OF: trial.number}
    for kept in ("baseline", "start", "refine", "seed"):
        if kept in trial.user_attrs:
            attrs[kept] = trial.user_attrs[kept]
    study.enqueue_trial(trial.params, user_attrs=attrs, skip_if_exists=False)


def counted(study: optuna.Study) -> int:
    """Finished trials that count toward the budget (an interrupted trial does not: it runs
    again), across every session and worker of the run."""
    return sum(t.state.is_finished() and not t.user_attrs.get("interrupted")
               for t in study.get_trials(deepcopy=False))


def claimed(study: optuna.Study) -> int:
    """Trials that count toward the budget plus those running now (in any worker): a worker
    starts a trial only while this is under the budget, so workers do not overshoot it."""
    return sum((t.state.is_finished() and not t.user_attrs.get("interrupted"))
               or t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))


@contextlib.contextmanager
def registered_worker(run_dir: Path) -> Iterator[None]:
    """Record this process as a worker of the run while the block runs."""
    folder = run_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    me = this_process()
    path = folder / f"{me['host']}-{me['pid']}.json"
    write_json(path, me)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _other_live_workers(run_dir: Path) -> bool:
    me = this_process()
    for path in (run_dir / "workers").glob("*.json"):
        try:
            owner = read_json(path)
        except (OSError, ValueError):
            continue
        if owner == me:
            continue
        alive = is_alive(owner)
        if alive is None or alive:
            return True
        path.unlink(missing_ok=True)  # a worker that died without unregistering
    return False


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One worker at a time: recovering trials (two must not re-enqueue the same one) and
    claiming the next trial against the budget."""
    with file_lock(run_dir / ".recovery.lock"):
        yield


def recover_stale_trials(study: optuna.Study, run_dir: Path,
                         say: Callable[[str], None] = print) -> list[int]:
    """Mark the trials of dead workers FAIL (interrupted) and enqueue their parameters once
    more; return their numbers. Trials of live workers are left alone, and so are those on
    other hosts unless the storage's heartbeat says their worker stopped."""
    recovered = []
    with run_lock(run_dir):
        others_alive = None
        stale = _stale_by_heartbeat(study)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.user_attrs.get(OWNER)
            if owner is not None:
                alive = is_alive(owner)
                if alive is None and trial._trial_id in stale:
                    who = (f"worker {owner['host']}:{owner['pid']} stopped sending its heartbeat "
                           "(none within the storage's grace period)")
                elif alive is not False:
                    continue
                else:
                    who = f"worker {owner['host']}:{owner['pid']} died"
            else:
                if others_alive is None:
                    others_alive = _other_live_workers(run_dir)
                if others_alive:
                    continue
                who = "its worker died before recording itself"
            storage, trial_id = study._storage, trial._trial_id
            try:
                storage.set_trial_user_attr(trial_id, "interrupted", True)
                storage.set_trial_user_attr(trial_id, "error", f"{who} while the trial ran; "
                                            "its parameters were enqueued again")
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # a worker on another host recovered it first
                continue
            enqueue_again(study, trial)
            recovered.append(trial.number)
    if recovered:
        say(f"recovered trials {recovered}: their workers died while running them (marked FAIL, "
            "not counted; their parameters run again)")
    return recovered
