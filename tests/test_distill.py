"""Distillation: the hint (feature) loss and the searchable distillation settings."""

from __future__ import annotations

from pathlib import Path

import torch

from slimsearch.compression import build
from slimsearch.compression.distill import FeatureHint, head_inputs
from slimsearch.experiment import TrainConfig
from slimsearch.search.teacher import prepare_teacher
from slimsearch.spaces import LayerRecipe, Recipe
from slimsearch.tasks import Task
from slimsearch.tasks.digits import digits_mlp
from slimsearch.training import TeacherTargets, fit

CPU = torch.device("cpu")


def test_hint_loss_pulls_student_features_towards_the_teacher(digits_mlp_task: Task) -> None:
    torch.manual_seed(0)
    teacher = digits_mlp(width=0.5).eval()
    student = digits_mlp(width=0.25, depth=1)
    target = head_inputs(teacher, "head", digits_mlp_task.train, device=CPU)
    assert target.shape == (len(digits_mlp_task.train), 128)
    hint = FeatureHint(student, "head", 128, weight=1.0)

    def hint_loss() -> float:
        with torch.no_grad():
            student(digits_mlp_task.train.x)
            return float(hint.loss(target))

    before = hint_loss()
    targets = TeacherTargets(logits=torch.zeros(len(digits_mlp_task.train), 10), features=target)
    fit(student, digits_mlp_task.train, epochs=3, lr=1e-2, batch_size=64, seed=0, device=CPU,
        teacher=targets, alpha=0.0, hint=hint)
    assert hint_loss() < 0.5 * before
    hint.detach()
    assert not student.head._forward_pre_hooks


def test_build_with_a_hint_weight_records_it(digits_mlp_task: Task, tmp_path: Path) -> None:
    train = TrainConfig(teacher_epochs=2, distill_epochs=1, finetune_epochs=0, qat_epochs=0)
    teacher = prepare_teacher(digits_mlp_task, train, seed=0, cache_dir=tmp_path, device=CPU)
    assert teacher.targets.features is not None and teacher.targets.head_width == 256
    recipe = Recipe(student={"width": 0.5, "depth": 1},
                    layers={"hidden.0": LayerRecipe(), "head": LayerRecipe()},
                    distillation={"hint_weight": 0.5, "temperature": 2.0})
    compressed = build(digits_mlp_task, teacher.model, teacher.targets, recipe, train=train,
                       seed=0, device=CPU)
    distill = compressed.record["stages"]["distill"]
    assert distill["hint_weight"] == 0.5 and distill["temperature"] == 2.0
    cached = prepare_teacher(digits_mlp_task, train, seed=0, cache_dir=tmp_path, device=CPU)
    assert not cached.trained_here
    assert torch.equal(cached.targets.features, teacher.targets.features)
