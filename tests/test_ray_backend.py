"""The Ray Tune backend: trials run by Ray land in the run's Optuna study like local ones.

Most tests share one ``ray.init(num_cpus=2)`` for the session (Ray takes seconds to start);
the kill test and the cluster test run the search in a subprocess, which starts or joins a
Ray of its own.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from slimsearch.cli import main

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install \"slimsearch[ray]\")")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = """\
name = "on-ray"
task = "digits-mlp"

[search]
trials = {trials}
sensitivity = false

[space]
bits = [4, 8, 32]
sparsity = [0.0, 0.5]

[space.student]
width = [0.25, 0.5]
depth = [1, 2]

[train]
teacher_epochs = 4
distill_epochs = {distill_epochs}
finetune_epochs = 1
qat_epochs = 1

[target]
device = "cpu"
"""


def write_experiment(folder: Path, *, trials: int = 6, distill_epochs: int = 2) -> Path:
    path = folder / "experiment.toml"
    path.write_text(EXPERIMENT.format(trials=trials, distill_epochs=distill_epochs))
    return path


def trials_of(run_dir: Path) -> list:
    from slimsearch.run import load_study

    return load_study(run_dir).get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_ray_search_fills_the_study_like_a_local_one(ray_session: None, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    assert main(["run", str(write_experiment(tmp_path)), "--run-dir", str(run_dir),
                 "--backend", "ray", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "Ray backend, 2 trials at once" in out
    trials = trials_of(run_dir)
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(t.user_attrs["backend"] == "ray" for t in trials)
    for t in trials:  # the trial ran in a Ray worker and wrote its files into the run folder
        folder = run_dir / "trials" / f"{t.number:05d}"
        assert (folder / "metrics.json").is_file()
        # a sampled recipe equal to a finished trial's (a seeded baseline, in a space this
        # small) is answered from that trial: its folder holds no model, the original's does
        built = run_dir / "trials" / f"{t.user_attrs.get('duplicate_of', t.number):05d}"
        assert t.values[1] == (built / "model.safetensors").stat().st_size
    assert main(["status", str(run_dir)]) == 0
    answered = sum("duplicate_of" in t.user_attrs for t in trials)  # not counted as built
    assert f"6 of 6 trials done ({6 - answered} complete" in capsys.readouterr().out
    assert (run_dir / "report.html").is_file()


def test_a_study_mixing_local_and_ray_trials_reports_them_together(
        ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from slimsearch.report.data import load_report_data

    experiment = write_experiment(tmp_path, trials=3)
    run_dir = tmp_path / "run"
    assert main(["run", str(experiment), "--run-dir", str(run_dir)]) == 0
    assert main(["resume", str(run_dir), "--trials", "6", "--backend", "ray"]) == 0
    trials = trials_of(run_dir)
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.user_attrs.get("backend", "local") for t in trials] == ["local"] * 3 + ["ray"] * 3
    assert main(["report", str(run_dir)]) == 0
    data = load_report_data(run_dir)
    # a trial that drew a finished trial's recipe again is answered, not built (DUPLICATE)
    assert len(data.completed) + data.count("DUPLICATE") == 6 and data.pareto
    capsys.readouterr()
    assert main(["pick", str(run_dir)]) == 0
    assert "picked trial" in capsys.readouterr().out


def test_a_ray_trial_past_the_deadline_is_pruned_not_completed(ray_session: None,
                                                               tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # far longer than the budget on any machine: a trial is surely running at the deadline
    experiment = write_experiment(tmp_path, trials=50, distill_epochs=100000)
    # 20 s: the teacher and Tune's start-up come first, and a busy machine is slow at both
    assert main(["run", str(experiment), "--run-dir", str(run_dir), "--backend", "ray",
                 "--timeout", "20s"]) == 0
    trials = trials_of(run_dir)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all("time budget" in t.user_attrs["stopped"] for t in pruned)
    # none of the stopped ones recorded as COMPLETE with partial figures
    assert all("metrics" not in t.user_attrs for t in pruned)
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_ray_not_reachable_is_a_clear_error_before_any_training(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    code = subprocess.run(
        [sys.executable, "-m", "slimsearch", "run", str(write_experiment(tmp_path)), "--run-dir",
         str(run_dir), "--ray-address", "127.0.0.1:9"], capture_output=True, text=True,
        cwd=REPO, timeout=120)
    assert code.returncode == 2, code.stderr
    assert "--ray-address 127.0.0.1:9: cannot reach it" in code.stderr
    assert not run_dir.exists()


def test_a_killed_ray_run_resumed_loses_no_finished_trial(tmp_path: Path) -> None:
    trials = 10
    experiment = write_experiment(tmp_path, trials=trials, distill_epochs=6)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLIMSEARCH_LOCK_DIR": str(tmp_path / "locks")}
    process = subprocess.Popen([sys.executable, "-m", "slimsearch", "run", str(experiment),
                                "--run-dir", str(run_dir), "--backend", "ray"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    # kill once a few trials are in, most likely inside a trial: a moment measured in this
    # machine's own time between finished trials, so that a fast one has not finished by then
    finished_at = []
    for line in process.stdout:
        if line.startswith(("[2/", "[3/")):
            finished_at.append(time.monotonic())
            if line.startswith("[3/"):
                break
    gap = finished_at[-1] - finished_at[0] if finished_at else 0.0
    time.sleep(random.Random(0).uniform(0.2, 0.8) * gap)
    assert process.poll() is None, "the search ended before the kill point"
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
    process.wait()
    before = {t.number: t.values for t in trials_of(run_dir) if t.state == TrialState.COMPLETE}
    assert len(before) >= 3
    finished = subprocess.run([sys.executable, "-m", "slimsearch", "resume", str(run_dir),
                               "--backend", "ray"], env=env, capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr
    after = trials_of(run_dir)
    assert not [t for t in after if t.state == TrialState.RUNNING]
    counted = [t for t in after if t.state.is_finished() and not t.user_attrs.get("interrupted")]
    assert len(counted) == trials
    kept = {t.number: t.values for t in after if t.number in before}
    assert kept == before  # no finished trial lost or changed


def test_joins_a_cluster_started_with_ray_start_head(tmp_path: Path) -> None:
    # A real head node on this machine. Ray binds to the machine's own interface address even
    # when asked for 127.0.0.1, so the client joins whatever address the head reports; token
    # authentication is on, and the client finds the token where `ray start` wrote it. The
    # head is ended by its process group: `ray start --block` ignores SIGTERM, and a
    # machine-wide `ray stop` would end other people's Ray too.
    ray_bin = Path(sys.executable).parent / "ray"
    # Ray's session folder holds Unix sockets, whose paths must stay short (about 100
    # characters): pytest's tmp_path is too deep for them
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLIMSEARCH_LOCK_DIR": str(tmp_path / "locks"),
           "RAY_TMPDIR": ray_tmp}
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--port", "0", "--num-cpus", "2",
                             "--include-dashboard", "false", "--block"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        address = None
        deadline = time.monotonic() + 90
        for line in head.stdout:
            match = re.search(r"--address='([^']+)'", line)
            if match:
                address = match.group(1)
                break
            assert time.monotonic() < deadline, "ray start --head did not report its address"
        assert address, "ray start --head did not report its address"
        run_dir = tmp_path / "run"
        done = subprocess.run([sys.executable, "-m", "slimsearch", "run",
                               str(write_experiment(tmp_path, trials=3)), "--run-dir", str(run_dir),
                               "--ray-address", address], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert [t.state for t in trials_of(run_dir)] == [TrialState.COMPLETE] * 3
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_backend_settings_are_checked_before_anything_runs(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    experiment = write_experiment(tmp_path)
    for line, field in (('backend = "spark"', "search.backend = 'spark'"),
                        ('ray_address = "auto"', "search.ray_address = 'auto' is only used with"),
                        ("cpus_per_trial = 0", "search.cpus_per_trial = 0")):
        bad = tmp_path / "bad.toml"
        bad.write_text(experiment.read_text().replace("[search]", f"[search]\n{line}"))
        assert main(["run", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
        assert field in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
