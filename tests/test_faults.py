"""Faults a real user hits, one test per case of issue 14: each asserts the exit code, that the
message names the field or file, that nothing outside the run folder changed and that no
finished trial was lost. The tiny runs here train for a second or two."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from slimsearch.cli import main

EXPERIMENT = """\
name = "{name}"
task = "{task}"
seed = 0

[search]
trials = {trials}
sensitivity = {sensitivity}
{search}
[space]
bits = [8, 32]
sparsity = [0.0, 0.5]

[train]
teacher_epochs = {teacher_epochs}
distill_epochs = 1
finetune_epochs = 1
qat_epochs = 1
{train}
[target]
device = "cpu"
"""

#: A plug-in module with a model whose forward fails for a pruned first layer, and tasks whose
#: data is wrong in ways a user's data can be.
FAULTY_TASKS = '''
import torch
import torch.nn.functional as F
from torch import nn

import slimsearch
from slimsearch.tasks import make_task as built_in


class Guarded(nn.Module):
    """An MLP whose forward refuses a pruned first layer (over 10% of its weights zero)."""

    def __init__(self, *, width: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, round(32 * width))
        self.fc2 = nn.Linear(round(32 * width), 10)

    def forward(self, x):
        if (self.fc1.weight == 0).float().mean() > 0.1:
            raise RuntimeError("fc1 cannot run pruned")
        return self.fc2(F.relu(self.fc1(x)))


@slimsearch.model_factory
def guarded(*, width: float = 1.0) -> nn.Module:
    return Guarded(width=width)


def _task(seed, **splits):
    digits = built_in("digits-mlp", seed=seed)
    data = {"train": digits.train, "val": digits.val, "test": digits.test}
    data.update({name: make(data[name]) for name, make in splits.items()})
    return slimsearch.Task(name="guarded", make_model=guarded, teacher_kwargs={"width": 1.0},
                           student_choices={"width": (0.5, 1.0)}, **data)


def guarded_task(seed):
    return _task(seed)


def slow_digits(seed):
    """digits-mlp, built slowly: two runs started together are both past their checks of the
    empty run folder before either creates the run."""
    import time

    time.sleep(4)
    return built_in("digits-mlp", seed=seed)


def narrow_val(seed):
    return _task(seed, val=lambda s: slimsearch.Split(s.x[:, :32], s.y))


def batches_not_pairs(seed):
    return _task(seed, val=lambda s: [s.x[:10]])


def _scored(seed, *metrics):
    digits = built_in("digits-mlp", seed=seed)
    return slimsearch.Task(name="scored", make_model=guarded, teacher_kwargs={"width": 1.0},
                           student_choices={"width": (0.5, 1.0)}, train=digits.train,
                           val=digits.val, test=digits.test, metrics=metrics)


def misspelled_metric(seed):
    return _scored(seed, "f1_marco")


def binary_f1_on_ten_classes(seed):
    return _scored(seed, "f1")


def float_labels(seed):
    return _task(seed, train=lambda s: slimsearch.Split(s.x, s.y.float()))


def labels_past_outputs(seed):
    return _task(seed, test=lambda s: slimsearch.Split(s.x, s.y * 10))
'''


def experiment(folder: Path, *, name: str = "tiny", task: str = "digits-mlp", trials: int = 3,
               sensitivity: bool = False, teacher_epochs: int = 3, search: str = "",
               train: str = "", file: str | None = None) -> Path:
    """A tiny experiment file in ``folder`` (with the plug-in module ``faulty_tasks`` beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "faulty_tasks.py").write_text(FAULTY_TASKS)
    path = folder / (file or f"{name}.toml")
    path.write_text(EXPERIMENT.format(name=name, task=task, trials=trials,
                                      sensitivity=str(sensitivity).lower(), search=search,
                                      teacher_epochs=teacher_epochs, train=train))
    return path


def tree(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every path under ``root`` (outside ``skip``) with the sha256 of each file."""
    found = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip) or "__pycache__" in path.parts:
            continue
        found[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest()
                                              if path.is_file() else "folder")
    return found


def finished_trials(run: Path) -> dict[int, tuple]:
    """The run's finished trials: number -> (state, values), read through the CLI's own path."""
    from slimsearch.run import load_study

    return {t.number: (t.state.name, t.values) for t in load_study(run).get_trials()
            if t.state.is_finished()}


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder that is also the current directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def done_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (journal storage), copied by tests that damage it. Run by another
    process, as a user's would be: its trials' owner is not alive in the tests."""
    folder = tmp_path_factory.mktemp("done")
    subprocess.run([sys.executable, "-m", "slimsearch", "run", str(experiment(folder)),
                    "--run-dir", str(folder / "run")], check=True, capture_output=True)
    return folder / "run"


def copy_of(run: Path, folder: Path) -> Path:
    shutil.copytree(run, folder / "run")
    return folder / "run"


# 1. An existing folder that is not a run folder -------------------------------------------------

def test_a_folder_slimsearch_did_not_make_is_refused_before_a_byte_is_written(
        work: Path, capsys: pytest.CaptureFixture) -> None:
    exp = experiment(work / "exp")
    (work / "p" / "teacher").mkdir(parents=True)
    (work / "p" / "teacher" / "mine.pt").write_text("x")
    (work / "p" / "report.html").write_text("keep")
    before = tree(work)
    assert main(["run", str(exp), "--run-dir", "p"]) == 2
    err = capsys.readouterr().err
    assert "--run-dir p" in err and "did not make" in err and "report.html" in err
    assert tree(work) == before

    # an empty folder is fine, and becomes a marked run folder
    (work / "empty").mkdir()
    assert main(["run", str(exp), "--run-dir", "empty", "--trials", "1"]) == 0
    assert (work / "empty" / ".slimsearch-run").is_file()


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b"])
def test_the_experiment_name_must_be_a_plain_folder_name(work: Path, name: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    exp = experiment(work / "exp", file="bad.toml")
    exp.write_text(exp.read_text().replace('name = "tiny"', f'name = "{name}"'))
    before = tree(work)
    assert main(["run", str(exp)]) == 2
    assert f"name = {name!r} is not allowed" in capsys.readouterr().err
    assert tree(work) == before


# 2. A relative SQLite URL ---------------------------------------------------------------------

def test_a_relative_sqlite_url_opens_the_same_database_from_anywhere(
        work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    exp = experiment(work / "exp", trials=2)
    (work / "a").mkdir()
    monkeypatch.chdir(work / "a")
    assert main(["run", str(exp), "--run-dir", "run", "--storage", "sqlite:///db.sqlite3"]) == 0
    run = work / "a" / "run"
    recorded = json.loads((run / "run.json").read_text())["storage"]
    assert recorded == f"sqlite:///{work / 'a' / 'db.sqlite3'}"
    trials = finished_trials(run)
    folders = tree(run / "trials")
    (work / "b").mkdir()
    monkeypatch.chdir(work / "b")
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    assert "2 of 2 trials done" in capsys.readouterr().out
    assert main(["resume", str(run), "--trials", "3"]) == 0
    assert not list((work / "b").iterdir())  # no new database here
    after = finished_trials(run)
    assert len(after) == 3 and all(after[n] == trials[n] for n in trials)
    assert all(tree(run / "trials")[k] == v for k, v in folders.items() if "metrics" in k)


def test_a_storage_without_the_runs_study_is_refused(done_run: Path, work: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    run = copy_of(done_run, work)
    trials = tree(run / "trials")
    (run / "study.journal").rename(work / "elsewhere.journal")  # moved away by hand
    assert main(["resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "does not hold this run's study" in err and "study.journal" in err
    assert tree(run / "trials") == trials


def test_a_run_made_before_urls_were_recorded_absolute_still_continues(
        work: Path, capsys: pytest.CaptureFixture) -> None:
    exp = experiment(work / "exp", trials=1)
    assert main(["run", str(exp), "--run-dir", "run", "--storage", "sqlite:///db.sqlite3"]) == 0
    settings = json.loads((work / "run" / "run.json").read_text())
    settings["storage"] = "sqlite:///db.sqlite3"  # as older slimsearch recorded it
    (work / "run" / "run.json").write_text(json.dumps(settings))
    assert main(["resume", "run", "--trials", "2"]) == 0
    assert len(finished_trials(work / "run")) == 2


def test_two_run_folders_never_share_one_study(work: Path, capsys: pytest.CaptureFixture) -> None:
    from slimsearch.errors import ConfigError
    from slimsearch.experiment import load_experiment
    from slimsearch.search import prepare, run_search

    exp = experiment(work / "exp", trials=1)
    url = f"sqlite:///{work / 'db.sqlite3'}"
    prepared = [prepare(load_experiment(exp), run_dir=work / run, storage_url=url)
                for run in ("one", "two")]  # both before either made its study
    run_search(prepared[0], exp, trials=1, timeout_s=None, say=lambda _: None)
    with pytest.raises(ConfigError, match="already holds a study named 'tiny'"):
        run_search(prepared[1], exp, trials=1, timeout_s=None, say=lambda _: None)
    assert not (work / "two" / "run.json").exists()
    assert main(["run", str(exp), "--run-dir", "three", "--storage", url]) == 2
    assert "already holds a study named 'tiny'" in capsys.readouterr().err


# 3. Two runs started at once -----------------------------------------------------------------

def test_of_two_experiments_prepared_at_once_only_the_first_creates_the_run(work: Path) -> None:
    """Both pass the checks on the empty folder; then one creates the run, and the other is
    refused when it gets the folder's setup lock instead of writing its trials beside."""
    from slimsearch.errors import ConfigError
    from slimsearch.experiment import load_experiment
    from slimsearch.search import prepare, run_search

    first, second = experiment(work / "a", trials=1), experiment(work / "b", trials=1,
                                                                 train="lr = 0.002")
    prepared = [prepare(load_experiment(p), run_dir=work / "run", storage_url=None)
                for p in (first, second)]
    run_search(prepared[0], first, trials=1, timeout_s=None, say=lambda _: None)
    trials = finished_trials(work / "run")
    with pytest.raises(ConfigError, match="changed: train.lr"):
        run_search(prepared[1], second, trials=2, timeout_s=None, say=lambda _: None)
    assert json.loads((work / "run" / "run.json").read_text())["experiment"]["train"]["lr"] == 0.001
    assert finished_trials(work / "run") == trials


@pytest.mark.slow
def test_two_runs_started_at_once(work: Path) -> None:
    """Different experiments: exactly one proceeds, the other exits 2. The same one twice:
    both run, the teacher is trained once and the budget is shared."""
    def start(exp: Path, run: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "slimsearch", "run", str(exp), "--run-dir",
                                 run], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    a = experiment(work / "a", task="faulty_tasks:slow_digits", teacher_epochs=20)
    b = experiment(work / "b", task="faulty_tasks:slow_digits", teacher_epochs=20,
                   train="lr = 0.002")
    outcomes = [p.communicate(timeout=300) + (p.returncode,)
                for p in [start(a, "diff"), start(b, "diff")]]
    assert sorted(code for *_, code in outcomes) == [0, 2], outcomes
    winner = next(i for i, (*_, code) in enumerate(outcomes) if code == 0)
    loser_err = outcomes[1 - winner][1]
    # refused after it passed the checks of the empty folder: by the check under the lock
    assert "holds a run of a different experiment" in loser_err and "train.lr" in loser_err
    lr = json.loads((work / "diff" / "run.json").read_text())["experiment"]["train"]["lr"]
    assert lr == (0.001, 0.002)[winner]

    outcomes = [p.communicate(timeout=300) + (p.returncode,)
                for p in [start(a, "same"), start(a, "same")]]
    assert [code for *_, code in outcomes] == [0, 0], outcomes
    said = "".join(out for out, *_ in outcomes)
    assert said.count("teacher (trained)") == 1 and said.count("teacher (cached)") == 1
    assert len(finished_trials(work / "same")) == 3  # one budget for both


# 4. A torn last journal line -------------------------------------------------------------------

@pytest.mark.parametrize("cut", [1, 2, 40, "half", "all-but-one"])
def test_a_torn_journal_tail_is_cut_back_before_anything_is_appended(
        done_run: Path, work: Path, cut: int | str, capsys: pytest.CaptureFixture) -> None:
    run = copy_of(done_run, work)
    journal = run / "study.journal"
    data = journal.read_bytes()
    last = data[data.rstrip(b"\n").rfind(b"\n") + 1:]
    keep = {"half": len(last) // 2, "all-but-one": 1}[cut] if isinstance(cut, str) \
        else len(last) - cut  # the bytes of the last record that reached the disk
    journal.write_bytes(data[:len(data) - len(last) + keep])  # a power cut during the append
    trials = finished_trials(run)
    assert main(["resume", str(run), "--trials", "4"]) == 0
    err = capsys.readouterr().err
    if cut == 1:  # only the line end was lost: the record is whole and kept
        assert "lost its line end" in err and not list(run.glob("study.journal.torn-*"))
    else:
        assert f"removed its {keep} bytes" in err and err.count("study.journal:") == 1
        (torn,) = run.glob("study.journal.torn-*")
        assert torn.read_bytes() == last[:keep]
    after = finished_trials(run)
    assert len([t for t in after.values() if t[0] == "COMPLETE"]) >= 4
    assert all(after[n] == trials[n] for n in trials if trials[n][0] == "COMPLETE")
    for command in (["status", str(run)], ["report", str(run)]):
        assert main(command) == 0
    assert main(["export", str(run), "--trial", "0", "--out", str(work / "b"), "--no-verify"]) == 0
    # plain Optuna reads it too
    study = optuna.load_study(study_name="tiny",
                              storage=JournalStorage(JournalFileBackend(str(journal))))
    assert len(study.get_trials()) == len(after) + sum(
        t.state.name not in ("COMPLETE", "FAIL", "PRUNED") for t in study.get_trials())


# 5. The sensitivity pre-pass --------------------------------------------------------------------

def test_a_layer_whose_forward_fails_pruned_is_left_unpruned_and_the_run_goes_on(
        work: Path, capsys: pytest.CaptureFixture) -> None:
    exp = experiment(work / "exp", task="faulty_tasks:guarded_task", sensitivity=True, trials=4)
    outside = tree(work, skip=(work / "run",))
    assert main(["run", str(exp), "--run-dir", "run"]) == 0
    sensitivity = json.loads((work / "run" / "sensitivity.json").read_text())
    assert sensitivity["layers"]["fc1"]["prunable"] is False
    assert "fc1 cannot run pruned" in sensitivity["layers"]["fc1"]["failed"]["sparsity 0.5"]
    assert "prunable" not in sensitivity["layers"]["fc2"]
    assert "layer fc1 failed the model's forward" in capsys.readouterr().out
    from slimsearch.run import load_study

    trials = load_study(work / "run").get_trials()
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert all(t.user_attrs["recipe"]["layers"]["fc1"]["sparsity"] == 0 for t in trials)
    # a resumed run reuses the record instead of failing again
    assert main(["resume", str(work / "run"), "--trials", "5"]) == 0
    assert len(finished_trials(work / "run")) == 5
    assert tree(work, skip=(work / "run",)) == outside


# 6. Crashes where a clear message belongs ----------------------------------------------------

@pytest.mark.parametrize(("change", "named"), [
    (("lr = 0.001", "lr = inf"), "train.lr = inf"),
    (("lr = 0.001", "lr = nan"), "train.lr = nan"),
    (("seed = 0", "seed = -1"), "seed = -1"),
    (("seed = 0", "seed = 4294967296"), "seed = 4294967296"),
    (("trials = 3", "trials = 3\ntimeout = -5"), "search.timeout"),
])
def test_bad_numbers_in_the_experiment_exit_2_naming_the_field(
        work: Path, change: tuple[str, str], named: str, capsys: pytest.CaptureFixture) -> None:
    exp = experiment(work / "exp", train="lr = 0.001")
    exp.write_text(exp.read_text().replace(*change))
    before = tree(work)
    assert main(["run", str(exp)]) == 2
    assert named in capsys.readouterr().err
    assert tree(work) == before


def test_a_timeout_in_plain_seconds_is_accepted(work: Path) -> None:
    from slimsearch.experiment import load_experiment, parse_duration

    exp = experiment(work / "exp", search="timeout = 90")
    config = load_experiment(exp)
    assert parse_duration(config.search.timeout) == 90.0


@pytest.mark.parametrize("case", ["not utf-8", "a folder"])
def test_an_unreadable_experiment_path_exits_2_naming_it(work: Path, case: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    exp = experiment(work / "exp")
    if case == "not utf-8":
        exp.write_bytes(exp.read_bytes().replace(b'"tiny"', b'"caf\xe9"'))
    target = str(exp if case == "not utf-8" else exp.parent)
    before = tree(work)
    assert main(["run", target]) == 2
    err = capsys.readouterr().err
    assert target in err
    assert ("not UTF-8" if case == "not utf-8" else "is a folder") in err
    assert tree(work) == before


@pytest.mark.parametrize("where", ["a file", "under a file", "not writable"])
def test_a_run_dir_that_cannot_be_a_folder_exits_2(work: Path, where: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    exp = experiment(work / "exp")
    (work / "file").write_text("mine")
    run_dir = {"a file": "file", "under a file": "file/run",
               "not writable": "/proc/slimsearch-test-run"}[where]
    if where == "not writable" and os.geteuid() != 0:
        (work / "locked").mkdir(mode=0o555)
        run_dir = "locked/run"
    before = tree(work)
    assert main(["run", str(exp), "--run-dir", run_dir]) == 2
    assert f"--run-dir {run_dir}" in capsys.readouterr().err
    assert tree(work) == before


@pytest.mark.parametrize(("task", "named"), [
    ("narrow_val", "the val split's samples have shape (32,), the train split's (64,)"),
    ("float_labels", "but metric 'accuracy' scores class indices"),
    ("labels_past_outputs", "the test split has label 90, but the teacher's model gives 10"),
    ("batches_not_pairs", "the val split's batch 0 is a Tensor, not (inputs, targets)"),
    ("misspelled_metric", "'f1_marco' is not a metric slimsearch knows. Did you mean 'f1_macro'?"),
    ("binary_f1_on_ten_classes", "metric 'f1' cannot score the model's outputs"),
])
def test_data_that_does_not_fit_the_task_is_refused_before_training(
        work: Path, task: str, named: str, capsys: pytest.CaptureFixture) -> None:
    exp = experiment(work / "exp", task=f"faulty_tasks:{task}")
    before = tree(work, skip=(work / "exp" / "__pycache__",))
    assert main(["run", str(exp)]) == 2
    assert named in capsys.readouterr().err
    assert tree(work) == before and not (work / "runs").exists()


def test_a_corrupt_run_json_exits_2_naming_it(done_run: Path, work: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    run = copy_of(done_run, work)
    (run / "run.json").write_text('{"experiment": {"name": "tin')  # cut short
    before = tree(work)
    for command in (["status", str(run)], ["resume", str(run)], ["report", str(run)],
                    ["pick", str(run)]):
        assert main(command) == 2
        assert f"{run / 'run.json'} cannot be read" in capsys.readouterr().err
    assert tree(work) == before


def test_export_of_a_trial_folder_without_metrics_exits_2(done_run: Path, work: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    run = copy_of(done_run, work)
    (run / "trials" / "00001" / "metrics.json").unlink()
    assert main(["export", str(run), "--trial", "1", "--out", "bundle"]) == 2
    err = capsys.readouterr().err
    assert "--trial 1" in err and "lacks metrics.json" in err
    assert not (work / "bundle").exists() and not list(work.glob(".bundle*"))


@pytest.mark.parametrize("tolerance", ["-1", "nan"])
def test_a_negative_tolerance_exits_2(done_run: Path, work: Path, tolerance: str,
                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(done_run), "--trial", "0", "--out", "bundle", "--no-verify"]) == 0
    capsys.readouterr()
    assert main(["verify", "bundle", "--tolerance", tolerance]) == 2
    assert f"--tolerance {float(tolerance)}" in capsys.readouterr().err
    assert main(["export", str(done_run), "--trial", "0", "--out", "again",
                 "--tolerance", tolerance]) == 2
    assert not (work / "again").exists()


# 7. A teacher that learned nothing ---------------------------------------------------------

def test_a_teacher_at_chance_level_is_said_loudly(work: Path, capsys: pytest.CaptureFixture) -> None:
    exp = experiment(work / "exp", train="lr = 1e9", trials=2)
    outside = tree(work, skip=(work / "run",))
    assert main(["run", str(exp), "--run-dir", "run"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the teacher's validation accuracy" in out
    assert "no better than always predicting the most common class" in out
    assert "train.lr = 1e+09" in out
    assert "warning: the teacher&#x27;s validation accuracy" in (work / "run" / "report.html").read_text()
    assert main(["pick", "run"]) == 0
    assert "WARNING: the teacher's validation accuracy" in capsys.readouterr().out
    assert tree(work, skip=(work / "run",)) == outside


# 8. Ctrl-C, then the printed command -----------------------------------------------------------

def test_the_continue_command_after_ctrl_c_continues_the_run(
        work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from slimsearch.search.objective import TrialRunner

    exp = experiment(work / "exp", trials=3)
    calls = []
    real = TrialRunner.__call__

    def interrupted_second(self, *args, **kwargs):  # Ctrl-C in the second trial
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TrialRunner, "__call__", interrupted_second)
    outside = tree(work)
    assert main(["run", str(exp), "--run-dir", "run", "--storage", "sqlite:///db.sqlite3"]) == 130
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("continue with:"))
    command = line.removeprefix("continue with: slimsearch ").split(" (")[0].split()
    monkeypatch.setattr(TrialRunner, "__call__", real)
    assert main(command) == 0
    states = [s for s, _ in finished_trials(work / "run").values()]
    assert states.count("COMPLETE") == 3
    assert tree(work, skip=(work / "run", work / "db.sqlite3")) == outside


# 9. A storage password --------------------------------------------------------------------------

PASSWORD = "Pa55-W0rd-in-URL"


@pytest.mark.postgres
@pytest.mark.slow
def test_a_storage_password_is_never_printed_stored_or_on_a_command_line(
        work: Path, postgres_url: str) -> None:
    url = postgres_url.replace("slimsearch@", f"slimsearch:{PASSWORD}@")  # trust: any password
    exp = experiment(work / "exp", trials=4, search=f'storage = "{url}"')
    env = {k: v for k, v in os.environ.items() if k != "SLIMSEARCH_STORAGE_PASSWORD"}
    main_process = subprocess.Popen(
        [sys.executable, "-m", "slimsearch", "run", str(exp), "--run-dir", "run", "--storage", url,
         "--workers", "2"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    command_lines, passwords = [], set()
    while main_process.poll() is None:
        for proc in Path("/proc").iterdir():
            try:
                words = (proc / "cmdline").read_bytes().decode().split("\0")
                if "--as-worker" in words:
                    environment = (proc / "environ").read_bytes().decode().split("\0")
                    command_lines.append(" ".join(words))
                    passwords |= {v.partition("=")[2] for v in environment
                                  if v.startswith("SLIMSEARCH_STORAGE_PASSWORD=")}
            except OSError:  # it ended meanwhile
                continue
        time.sleep(0.05)
    out, err = main_process.communicate()
    assert main_process.returncode == 0, err
    assert command_lines, "no worker process was seen"
    assert not [c for c in command_lines if PASSWORD in c]
    assert passwords == {PASSWORD}  # through the environment (the test server trusts anyone)
    assert PASSWORD not in out + err
    for path in (work / "run").rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    assert "storage" in (work / "run" / "experiment.toml").read_text()
    assert len(finished_trials(work / "run")) == 4

    # a server that cannot be reached: the message shows the URL without the password
    unreachable = f"postgresql://slimsearch:{PASSWORD}@127.0.0.1:1/none"
    done = subprocess.run([sys.executable, "-m", "slimsearch", "run", str(exp), "--run-dir", "x",
                           "--storage", unreachable], cwd=work, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 2 and "cannot be opened" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr and "slimsearch:***@" in done.stderr


def test_storage_urls_lose_their_password_and_get_it_back_only_to_connect(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slimsearch.errors import ConfigError
    from slimsearch.run.folder import experiment_copy
    from slimsearch.run.storage import (
        PASSWORD_ENV,
        _connect_url,
        mask,
        public_url,
        shown,
    )

    assert public_url("postgresql://me:pa%20ss@host:5432/db") == ("postgresql://me@host:5432/db",
                                                                   "pa ss")
    assert public_url("postgresql://me@host/db") == ("postgresql://me@host/db", None)
    assert public_url("sqlite:///rel/db.sqlite3?timeout=5") == (
        f"sqlite:///{work / 'rel' / 'db.sqlite3'}?timeout=5", None)
    with pytest.raises(ConfigError, match="write an '@' inside the password as %40"):
        public_url("postgresql://me:p@ss@host/db")
    with pytest.raises(ConfigError, match="in-memory"):
        public_url("sqlite://")
    monkeypatch.setenv(PASSWORD_ENV, "p@ss w:rd")
    from sqlalchemy.engine import make_url

    assert make_url(_connect_url("postgresql://me@host/db")).password == "p@ss w:rd"
    assert _connect_url(f"sqlite:///{work}/db") == f"sqlite:///{work}/db"
    assert shown("postgresql://me@host/db") == "postgresql://me:***@host/db"
    assert mask("failed for postgresql://me:pa ss@host/db (pa ss)", "pa ss") == \
        "failed for postgresql://me:***@host/db (***)"
    exp = experiment(work / "exp", search='storage = "postgresql://me:pa%20ss@host/db"')
    copy = experiment_copy(exp)
    assert 'storage = "postgresql://me@host/db"' in copy and "pa%20ss" not in copy
    assert copy.replace('storage = "postgresql://me@host/db"', "") == \
        exp.read_text().replace('storage = "postgresql://me:pa%20ss@host/db"', "")


# 10. Loading a bundle never imports from the current folder -----------------------------------

def _crafted_bundle(done_run: Path, work: Path, module: str) -> Path:
    """An export of ``done_run`` whose model file names ``module:factory``, with a manifest
    that matches (a manifest is a checksum, not a signature)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from slimsearch.manifest import sha256

    bundle = work / "bundle"
    assert main(["export", str(done_run), "--trial", "0", "--out", str(bundle),
                 "--no-verify"]) == 0
    path = bundle / "model.safetensors"
    with safe_open(str(path), framework="pt") as reader:
        meta = reader.metadata()
        tensors = {k: reader.get_tensor(k) for k in reader.keys()}
    header = json.loads(meta["slimsearch"])
    header["factory"] = f"{module}:factory"
    save_file(tensors, str(path), metadata={"slimsearch": json.dumps(header)})
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = sha256(path)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")
"""


def test_load_model_never_imports_a_module_lying_in_the_current_folder(
        done_run: Path, work: Path) -> None:
    bundle = _crafted_bundle(done_run, work, "planted_module")
    marker = work / "it-ran"
    (work / "planted_module.py").write_text(EVIL.format(marker=str(marker)))
    script = "import sys, slimsearch\ntry:\n    slimsearch.load_model(sys.argv[1])\n" \
             "except slimsearch.ArtifactError as exc:\n    print(exc)\n    sys.exit(3)\n"
    done = subprocess.run([sys.executable, "-c", script, str(bundle)], cwd=work,
                          capture_output=True, text=True)  # -c: the current folder is on the path
    assert done.returncode == 3, done.stdout + done.stderr
    assert "refusing to run it" in done.stdout and "planted_module" in done.stdout
    assert not marker.exists()
    # a link in the current folder to a module elsewhere is still found in the current folder
    (work / "elsewhere").mkdir()
    shutil.move(work / "planted_module.py", work / "elsewhere" / "planted_module.py")
    (work / "planted_module.py").symlink_to(work / "elsewhere" / "planted_module.py")
    done = subprocess.run([sys.executable, "-c", script, str(bundle)], cwd=work,
                          capture_output=True, text=True)
    assert done.returncode == 3 and not marker.exists(), done.stdout + done.stderr
    # beside the model file, on the path however it got there
    (work / "planted_module.py").unlink()
    (work / "elsewhere" / "planted_module.py").unlink()
    (bundle / "planted_module.py").write_text(EVIL.format(marker=str(marker)))
    done = subprocess.run([sys.executable, "-c", script, str(bundle)], cwd=work / "elsewhere",
                          env={**os.environ, "PYTHONPATH": str(bundle)}, capture_output=True,
                          text=True)
    assert done.returncode == 3 and not marker.exists(), done.stdout + done.stderr
    assert str(bundle) in done.stdout


@pytest.mark.slow
def test_verify_never_imports_a_module_lying_in_the_current_folder(done_run: Path,
                                                                    work: Path) -> None:
    bundle = _crafted_bundle(done_run, work, "planted_module")
    marker = work / "it-ran"
    (work / "planted_module.py").write_text(EVIL.format(marker=str(marker)))
    done = subprocess.run([sys.executable, "-m", "slimsearch", "verify", str(bundle), "--run-dir",
                           str(done_run)], cwd=work, capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot re-measure" in done.stderr and not marker.exists()


def test_the_readme_says_what_a_bundle_may_make_python_import() -> None:
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "never imports a module from the current directory" in readme
    assert "## When things go wrong" in readme


# 11. One manifest checker, nothing outside the bundle -------------------------------------------

@pytest.mark.parametrize("entry", ["../outside.txt", "/etc/hostname", "sub/../../outside.txt",
                                   "link.txt"])
def test_a_manifest_entry_outside_the_bundle_is_refused_by_every_reader(
        done_run: Path, work: Path, entry: str, capsys: pytest.CaptureFixture) -> None:
    import slimsearch

    bundle = work / "bundle"
    assert main(["export", str(done_run), "--trial", "0", "--out", str(bundle),
                 "--no-verify"]) == 0
    (work / "outside.txt").write_text("not the bundle's")
    if entry == "link.txt":
        (bundle / "link.txt").symlink_to(work / "outside.txt")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][entry] = hashlib.sha256(b"not the bundle's").hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    message = f"lists {entry!r}, which is not a file directly in the bundle folder"
    with pytest.raises(slimsearch.ArtifactError, match="not a file directly in the bundle"):
        slimsearch.load_model(bundle)
    capsys.readouterr()
    assert main(["verify", str(bundle), "--manifest-only"]) == 2
    assert message in capsys.readouterr().err


def test_a_manifest_that_leaves_the_model_file_unchecked_is_refused(
        done_run: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    import slimsearch

    bundle = work / "bundle"
    assert main(["export", str(done_run), "--trial", "0", "--out", str(bundle),
                 "--no-verify"]) == 0
    (bundle / "manifest.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(slimsearch.ArtifactError, match="does not list model.safetensors"):
        slimsearch.load_model(bundle)
    capsys.readouterr()
    assert main(["verify", str(bundle), "--manifest-only"]) == 2
    assert "does not list model.safetensors" in capsys.readouterr().err
