"""Metrics of the user's choice: scikit-learn's by name or a function, their direction, the
loss that follows the targets, and a regression end to end (tasks.metrics)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sklearn.metrics import f1_score, mean_squared_error

import slimsearch
from slimsearch.cli import main
from slimsearch.errors import ConfigError
from slimsearch.evaluators import chance_score
from slimsearch.tasks import Split, Task, make_task
from slimsearch.tasks.metrics import BUILT_IN, drop_text, resolve_metrics
from slimsearch.training import distillation_loss, fit, score, supervised_loss

CPU = torch.device("cpu")


def test_names_score_as_scikit_learn_does() -> None:
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 4, generator=generator), torch.randint(0, 4, (50,))
    assert BUILT_IN["f1_macro"].score(logits, labels) == pytest.approx(
        f1_score(labels, logits.argmax(1), average="macro"))
    outputs, targets = torch.randn(30, 1), torch.randn(30)
    mse = mean_squared_error(targets, outputs[:, 0])
    assert BUILT_IN["neg_mean_squared_error"].score(outputs, targets) == pytest.approx(-mse)
    assert 0 < BUILT_IN["roc_auc"].score(logits, labels) < 1


def test_a_function_of_ones_own_is_oriented_and_named() -> None:
    mae = slimsearch.metric(lambda o, t: float((o[:, 0] - t).abs().mean()), name="mae",
                            greater_is_better=False, kind="regression")
    assert mae.label == "neg_mae"
    assert mae.score(torch.ones(2, 1), torch.zeros(2)) == -1.0
    assert resolve_metrics([mae, "r2"], where="metrics")[0] is mae


@pytest.mark.parametrize(("specs", "message"), [
    (["f1_marco"], "'f1_marco' is not a metric slimsearch knows. Did you mean 'f1_macro'?"),
    (["accuracy", "r2"], "mixes classification and regression"),
    (["accuracy", "accuracy"], "names a metric twice"),
    ([], "at least one metric"),
    ("accuracy", "give a list"),
])
def test_a_metric_that_does_not_exist_or_fit_is_named_with_the_fix(specs, message: str) -> None:
    with pytest.raises(ConfigError, match="task 'x': metrics") as caught:
        resolve_metrics(specs, where="task 'x': metrics")
    assert message in str(caught.value)


def test_a_task_refuses_an_unknown_metric_when_it_is_made(digits_mlp_task: Task) -> None:
    t = digits_mlp_task
    with pytest.raises(ConfigError, match="'auc' is not a metric"):
        Task(name="t", make_model=t.make_model, teacher_kwargs=t.teacher_kwargs,
             student_choices=t.student_choices, train=t.train, val=t.val, test=t.test,
             metrics=("auc",))


def _regression_task(**splits) -> Task:
    base = make_task("diabetes-mlp", seed=0)
    return Task(name="r", make_model=base.make_model, teacher_kwargs=base.teacher_kwargs,
                student_choices=base.student_choices, metrics=base.metrics,
                **{"train": base.train, "val": base.val, "test": base.test, **splits})


@pytest.mark.parametrize(("split", "message"), [
    (lambda s: Split(s.x, s.y.round().long().clamp(min=0)), "scores a regression"),
    (lambda s: Split(s.x, torch.stack([s.y, s.y], 1)), "scores a regression"),
])
def test_targets_that_do_not_fit_a_regression_stop_before_training(split, message: str) -> None:
    base = make_task("diabetes-mlp", seed=0)
    with pytest.raises(ConfigError, match=message) as caught:
        _regression_task(val=split(base.val)).check_data()
    assert "the val split's targets" in str(caught.value) and "float32" in str(caught.value)


def test_the_loss_follows_the_targets() -> None:
    logits = torch.randn(8, 3)
    assert torch.isclose(supervised_loss(logits, torch.zeros(8, dtype=torch.int32)),
                         torch.nn.functional.cross_entropy(logits, torch.zeros(8, dtype=torch.long)))
    column, y = torch.randn(8, 1), torch.randn(8)
    assert torch.isclose(supervised_loss(column, y), ((column[:, 0] - y) ** 2).mean())
    teacher = torch.randn(8, 1)
    both = distillation_loss(column, y, teacher, temperature=4.0, alpha=0.5)
    assert torch.isclose(both, 0.5 * ((column - teacher) ** 2).mean()
                         + 0.5 * ((column[:, 0] - y) ** 2).mean())


def test_a_regression_trains_and_beats_guessing_the_mean() -> None:
    task = make_task("diabetes-mlp", seed=0)
    model = task.make_model(**task.teacher_kwargs)
    fit(model, task.data("train"), epochs=40, lr=1e-3, batch_size=64, seed=0, device=CPU)
    found = score(model, task.data("val"), task.metric, device=CPU)
    guess = chance_score(task.data("val"), task.metric)
    assert task.metric.label == "neg_mean_squared_error"
    assert guess < -0.9 and found > guess + 0.2
    assert drop_text(0.05, {"metric": "neg_mean_squared_error", "metric_fraction": False}) == "0.05"
    assert drop_text(0.01, {"metric": "accuracy"}) == "1.00 points"


def test_guessing_the_most_common_class_scores_its_share(digits_mlp_task: Task) -> None:
    val = digits_mlp_task.data("val")
    share = float(torch.bincount(val.targets()).max()) / len(val.targets())
    assert chance_score(val, BUILT_IN["accuracy"]) == pytest.approx(share)


@pytest.mark.slow
def test_the_diabetes_regression_end_to_end(tmp_path: Path) -> None:
    """search, report, pick, export, and load_model in a fresh process reproduces the
    exported trial's test score exactly."""
    experiment = (Path(__file__).parents[1] / "experiments" / "diabetes_mlp.toml").read_text()
    experiment = experiment.replace("trials = 20", "trials = 8").replace(
        "teacher_epochs = 40", "teacher_epochs = 20")
    (tmp_path / "diabetes.toml").write_text(experiment)
    run_dir = tmp_path / "run"
    assert main(["run", str(tmp_path / "diabetes.toml"), "--run-dir", str(run_dir)]) == 0
    pareto = json.loads((run_dir / "pareto.json").read_text())
    teacher = pareto["teacher"]
    assert teacher["metric"] == "neg_mean_squared_error" and -0.9 < teacher["val_accuracy"] < 0
    assert teacher["val_score_r2"] > 0.1  # the second metric, reported
    assert teacher["val_score_neg_mean_squared_error"] == teacher["val_accuracy"]
    html = (run_dir / "report.html").read_text()
    assert "validation neg_mean_squared_error" in html
    assert main(["pick", str(run_dir), "--max-accuracy-drop", "0.2"]) == 0
    entry = min(pareto["trials"], key=lambda t: t["metrics"]["size_bytes"])
    bundle = tmp_path / "bundle"
    assert main(["export", str(run_dir), "--trial", str(entry["number"]), "--out", str(bundle),
                 "--tolerance", "1.0"]) == 0
    script = textwrap.dedent(f"""
        import torch
        import slimsearch
        from slimsearch.tasks import make_task
        from slimsearch.training import score
        task = make_task("diabetes-mlp", seed=0)
        model = slimsearch.load_model({str(bundle)!r})
        print(repr(score(model, task.data("test"), task.metric, device=torch.device("cpu"))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert float(out.stdout.strip()) == entry["metrics"]["test_accuracy"]


def test_the_experiment_may_name_the_metrics_of_a_built_in_task(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from slimsearch.experiment import load_experiment

    task = make_task("digits-mlp", seed=0, metrics=["f1_macro", "accuracy"])
    assert [m.label for m in task.scores] == ["f1_macro", "accuracy"]
    assert make_task("digits-mlp", seed=0).metric.label == "accuracy"  # the task's own
    experiment = tmp_path / "e.toml"
    experiment.write_text('name = "e"\ntask = "digits-mlp"\nmetrics = ["f1_makro"]\n'
                          "[search]\ntrials = 1\n")
    assert load_experiment(experiment).metrics == ("f1_makro",)
    assert main(["run", str(experiment), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "metrics = ['f1_makro']: 'f1_makro' is not a metric" in err and "'f1_macro'" in err
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained
