"""Validation accuracy after every epoch of every training stage, for the hand-made recipes.

    python benchmarks/stage_curves.py [--seed 0] [--cache runs/benchmark-teachers]
    python benchmarks/stage_curves.py --stopped RUN_DIR

What ``[constraints]``'s early stop (``search.objective.early_stop_epoch``) rests on: how far
a trial's accuracy still climbs after the epoch at which it is judged. The teacher and the
training settings are those of experiments/digits_cnn.toml (the teacher cached under
--cache); each recipe is built by the pipeline a search uses, and its float model is scored
on the validation split before each epoch past the first. Prints one row per recipe: the
stages' curves, with the epoch each rule judges marked (``2*``: after 2 epochs, the rule
before; ``7^``: half the stage, where the current rule looks when that is later).

``--stopped RUN_DIR``: instead, every trial of that run that the early stop stopped, built
again to the end with its own seed, its curves, and whether its float model then met
``max_accuracy_drop`` (the early stop's own measure: it scores the float model).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from compression import recipes

from slimsearch.compression import build
from slimsearch.experiment import ExperimentConfig, load_experiment
from slimsearch.report.data import load_report_data
from slimsearch.search.objective import early_stop_epoch, runner_for_run
from slimsearch.search.teacher import Teacher, prepare_teacher
from slimsearch.spaces import Recipe, SearchSpace
from slimsearch.tasks import Task, make_task
from slimsearch.training import score

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SHOWN = ("student width 0.5, sliced", "student width 0.5, scratch", "structured 50% + int8 w+a",
         "structured 50% + 4-bit w + int8 a", "structured 75% + int8 w+a",
         "width 0.5 sliced + structured 50% + int8 w+a")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "benchmark-teachers")
    parser.add_argument("--stopped", type=Path, help="a run folder: rebuild its stopped trials")
    args = parser.parse_args()
    if args.stopped:
        rebuild_stopped(args.stopped)
        return
    config = load_experiment(ROOT / "experiments" / "digits_cnn.toml")
    task = make_task(config.task, seed=args.seed)
    teacher = prepare_teacher(task, config.train, seed=args.seed,
                              cache_dir=args.cache / f"{task.name}-seed-{args.seed}", device=CPU)
    val = task.data("val")
    after = config.constraints.early_stop_after_epochs
    print(f"machine: {platform.processor() or platform.machine()}; torch {torch.__version__}; "
          f"{task.name}, seed {args.seed}; teacher val "
          f"{score(teacher.model, val, task.metric, device=CPU):.3f}; train {config.train}")
    made = recipes(task, SearchSpace(task, config.space))
    for label in SHOWN:
        curve, final = stage_curve(task, teacher, made[label], config, seed=args.seed)
        print(f"| {label} | {rendered(curve, after=after)} | float model at the end "
              f"{final:.3f} |", flush=True)


def rebuild_stopped(run_dir: Path) -> None:
    """Build every trial the early stop stopped in ``run_dir`` to the end; print its curves
    and whether it would have met ``max_accuracy_drop``."""
    runner = runner_for_run(str(run_dir))
    config, task = runner.config, runner.task
    floor = runner.teacher_metrics["val_accuracy"] - config.constraints.max_accuracy_drop
    stopped = [t for t in load_report_data(run_dir).trials
               if t.state == "PRUNED" and t.stopped and "stopped early" in t.stopped]
    met = 0
    for t in stopped:
        seed = config.seed if t.baseline else config.seed + t.number  # as the search trains it
        curve, final = stage_curve(task, runner.teacher, Recipe.from_dict(t.recipe), config,
                                   seed=seed)
        met += final >= floor
        print(f"| trial {t.number} | {t.stopped[len('stopped early: '):][:60]} | "
              f"{rendered(curve)} | {final:.3f}{' MET' if final >= floor else ''} |",
              flush=True)
    print(f"{met} of {len(stopped)} stopped trials met max_accuracy_drop (validation >= "
          f"{floor:.4f}) when built to the end")


def rendered(curve: list[tuple[str, int, int, float]], *, after: int | None = None) -> str:
    """Each stage's curve on one line; given ``after`` (early_stop_after_epochs), the epoch
    the rule before judged marked ``*`` and the one the current rule judges ``^``."""
    stages = []
    for stage in dict.fromkeys(s for s, *_ in curve):
        points = [(e, n, v) for s, e, n, v in curve if s == stage]
        epochs = points[0][1]
        marks = dict.fromkeys(range(1, epochs), "")
        if after is not None:
            marks[max(1, min(after, epochs - 1))] += "*"
            marks[early_stop_epoch(epochs, after)] += "^"
        stages.append(f"{stage} " + " ".join(f"{e}{marks[e]}:{v:.3f}" for e, _, v in points))
    return " / ".join(stages)


def stage_curve(task: Task, teacher: Teacher, recipe: Recipe, config: ExperimentConfig, *,
                seed: int) -> tuple[list[tuple[str, int, int, float]], float]:
    """(stage, epochs done, the stage's epochs, validation score) before each epoch past
    the first of every stage of building ``recipe``, and the float model's score at the end."""
    val = task.data("val")
    curve = []

    def check(model: torch.nn.Module, stage: str, epoch: int, epochs: int) -> None:
        if epoch:
            was_training = model.training
            curve.append((stage, epoch, epochs, score(model, val, task.metric, device=CPU)))
            model.train(was_training)

    compressed = build(task, teacher.model, teacher.targets, recipe, train=config.train,
                       seed=seed, device=CPU, round_to=config.space.channel_multiple,
                       check=check)
    return curve, score(compressed.model, val, task.metric, device=CPU)


if __name__ == "__main__":
    main()
