"""Crash recovery: a real search killed with SIGKILL at random moments and resumed, again and
again, loses no finished trial, runs the killed trial's parameters once more, and ends with
exactly the budget; a trial that cannot finish before the deadline is recorded PRUNED."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from slimsearch.cli import main
from slimsearch.search.recovery import RETRY_OF, is_alive, this_process

REPO = Path(__file__).resolve().parents[1]

EXPERIMENT = """\
name = "killed"
task = "digits-mlp"

[search]
trials = {trials}

[space]
bits = [4, 8, 32]
sparsity = [0.0, 0.5]

[space.student]
width = [0.25, 0.5]
depth = [1, 2]

[train]
teacher_epochs = 4
distill_epochs = 2
finetune_epochs = 2
qat_epochs = 2

[target]
device = "cpu"
"""


def study_of(run_dir: Path) -> optuna.Study:
    from slimsearch.run import load_study

    return load_study(run_dir)


def test_owner_records_tell_a_live_process_from_a_dead_one() -> None:
    me = this_process()
    assert is_alive(me) is True
    assert is_alive({**me, "process_start": (me["process_start"] or 0) + 1}) is False  # pid reused
    assert is_alive({**me, "host": "another-machine"}) is None  # cannot tell: left alone


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["journal", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_killed_and_resumed_searches_lose_nothing_and_finish_the_budget(
        storage: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    trials = 30
    experiment = tmp_path / "killed.toml"
    # the budget is given on the command line, and the final `resume` continues to it by itself
    experiment.write_text(EXPERIMENT.format(trials=10).replace(
        "distill_epochs = 2", "distill_epochs = 8").replace("finetune_epochs = 2",
                                                            "finetune_epochs = 6"))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "slimsearch", "run", str(experiment), "--run-dir", str(run_dir),
               "--trials", str(trials)]
    if storage == "postgres":  # the resume below finds the storage in the run folder
        command += ["--storage", request.getfixturevalue("postgres_url")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLIMSEARCH_LOCK_DIR": str(tmp_path / "locks")}
    rng = random.Random(5)
    kills = 0
    for _ in range(5):
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        # a random moment within the next few trials, in units of this machine's own trial
        # time: fixed delays landed before the first trial on a busy machine (starting up took
        # 3-6 s), and let a quiet one (0.15 s trials) finish the budget before the 5th kill
        finished_at = []
        for line in process.stdout:
            if line.startswith("["):  # a trial finished: the next one is under way
                finished_at.append(time.monotonic())
                if len(finished_at) == 2:
                    break
        if len(finished_at) == 2:
            time.sleep(rng.uniform(0.1, 3.0) * (finished_at[1] - finished_at[0]))
        if process.poll() is not None:  # finished before the kill point
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        kills += 1
    assert kills == 5, "each of the 5 kill points should land in a running search"
    finished = subprocess.run([sys.executable, "-m", "slimsearch", "resume", str(run_dir)],
                              env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr

    study = study_of(run_dir)
    all_trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in all_trials if t.state == TrialState.RUNNING]
    counted = [t for t in all_trials if t.state.is_finished() and not t.user_attrs.get("interrupted")]
    assert len(counted) == trials  # the budget, exactly
    for t in counted:
        if t.state == TrialState.COMPLETE:  # every finished trial's files are all there
            assert (run_dir / "trials" / f"{t.number:05d}" / "metrics.json").is_file()
    killed = [t for t in all_trials if t.user_attrs.get("interrupted")]
    retries = [t.user_attrs[RETRY_OF] for t in all_trials if RETRY_OF in t.user_attrs]
    assert len(retries) == len(set(retries))  # each killed trial ran again once, not twice
    for t in killed:
        if t.params and RETRY_OF not in t.user_attrs:
            again = [r for r in all_trials if r.user_attrs.get(RETRY_OF) == t.number]
            # the same parameters run again (a kill during suggest leaves only some of them:
            # the retry keeps those and samples the rest)
            assert again and t.params.items() <= again[0].params.items()
    assert killed, "at least one kill should have landed inside a trial"
    assert all("died" in t.user_attrs["error"] for t in killed)


@pytest.mark.slow
def test_a_trial_past_the_deadline_is_pruned_not_completed(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    experiment = tmp_path / "slow.toml"
    # every trial distils (no student width of 1), for far longer than the 8 s budget on any
    # machine (400 epochs took 7.8 s on CI and finished in time); no pre-pass, so that a busy
    # machine still reaches the first trial within the budget
    experiment.write_text(EXPERIMENT.format(trials=50).replace("distill_epochs = 2",
                                                                 "distill_epochs = 100000")
                          .replace("[search]", "[search]\nsensitivity = false"))
    run_dir = tmp_path / "run"
    assert main(["run", str(experiment), "--run-dir", str(run_dir), "--timeout", "8s"]) == 0
    study = study_of(run_dir)
    pruned = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.PRUNED]
    assert pruned, "a long distillation past the deadline is stopped"
    assert all("time budget" in t.user_attrs["stopped"] for t in pruned)
    assert not [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    assert "time budget reached" in capsys.readouterr().out
    assert (run_dir / "report.html").is_file()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # Optuna: "meant for optimize"
def test_a_trial_whose_heartbeat_stopped_on_another_host_is_recovered(tmp_path: Path) -> None:
    from optuna.storages import RDBStorage

    from slimsearch.search.recovery import OWNER, heartbeat, recover_stale_trials

    storage = RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite3'}", heartbeat_interval=1,
                         grace_period=1)
    study = optuna.create_study(storage=storage)
    elsewhere = {"host": "another-machine", "pid": 1, "process_start": 1}
    beating, stopped = study.ask(), study.ask()
    for trial in (beating, stopped):
        trial.suggest_int("x", 0, 9)
        trial.set_user_attr(OWNER, elsewhere)  # cannot be checked from here
    storage.record_heartbeat(stopped._trial_id)
    with heartbeat(study, beating):
        time.sleep(2.5)
        assert recover_stale_trials(study, tmp_path, say=lambda _: None) == [stopped.number]
    again = study.get_trials(deepcopy=False)
    assert again[stopped.number].state == TrialState.FAIL
    assert "heartbeat" in again[stopped.number].user_attrs["error"]
    assert again[beating.number].state == TrialState.RUNNING
    assert again[-1].user_attrs[RETRY_OF] == stopped.number  # its parameters run again


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    assert main(["resume", str(tmp_path)]) == 2
    assert "not a slimsearch run folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_workers_share_one_journal_and_lose_nothing(workers: int, tmp_path: Path) -> None:
    trials = 16  # 8 with `run`, 8 more with `resume`
    experiment = tmp_path / "shared.toml"
    experiment.write_text(EXPERIMENT.format(trials=trials))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLIMSEARCH_LOCK_DIR": str(tmp_path / "locks")}
    # half the budget with `run`, the rest with `resume` (workers started either way)
    done = subprocess.run([sys.executable, "-m", "slimsearch", "run", str(experiment),
                           "--run-dir", str(run_dir), "--workers", str(workers), "--trials",
                           str(trials // 2)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(study_of(run_dir).get_trials(deepcopy=False)) == trials // 2
    done = subprocess.run([sys.executable, "-m", "slimsearch", "resume", str(run_dir),
                           "--workers", str(workers), "--trials", str(trials)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    trials_ = study_of(run_dir).get_trials(deepcopy=False)
    assert len(trials_) == trials  # exactly the budget: no worker overshot it
    assert all(t.state == TrialState.COMPLETE for t in trials_)
    owners = {t.user_attrs["owner"]["pid"] for t in trials_}
    assert len(owners) >= 2, "trials ran in more than one process"
    for t in trials_:
        metrics = run_dir / "trials" / f"{t.number:05d}" / "metrics.json"
        assert metrics.is_file() and t.user_attrs["metrics"]["size_bytes"] > 0
    assert not list((run_dir / "workers").glob("*.json"))  # every worker unregistered


def test_errors_that_differ_only_in_numbers_or_addresses_count_as_the_same() -> None:
    from slimsearch.search.lifecycle import error_kind

    assert (error_kind("RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x16 and 32x10)")
            == error_kind("RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x8 and 4x10)"))
    assert (error_kind("TypeError: <Net object at 0x7f3ab2c4d0> is not callable")
            == error_kind("TypeError: <Net object at 0x7f99e01a10> is not callable"))
    assert error_kind("ValueError: bad input") != error_kind("KeyError: 'x'")
