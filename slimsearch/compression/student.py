"""The student: the task's model built with the recipe's knobs, started from the teacher or fresh."""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimsearch.spaces import Recipe
from slimsearch.tasks import Task
from slimsearch.tasks.attention import unpack_attention


def build_student(task: Task, teacher: nn.Module, recipe: Recipe, *, seed: int) -> nn.Module:
    """``task.build_model(**recipe.student)``; with ``student_init = "slice"`` every parameter
    and buffer the teacher also has is copied from it (a leading slice where the student is
    narrower), so width 1.0 starts as the teacher itself. The teacher's attention is read
    unpacked, as the student's is built (``tasks.attention``)."""
    torch.manual_seed(seed)
    student = task.build_model(**recipe.student)
    if recipe.student_init == "slice":
        if any(isinstance(m, nn.MultiheadAttention) for m in teacher.modules()):
            teacher = copy.deepcopy(teacher)
            unpack_attention(teacher)
        copy_leading_slices(student, teacher)
    return student


@torch.no_grad()
def copy_leading_slices(student: nn.Module, teacher: nn.Module) -> int:
    """Copy ``teacher[:n, :m, ...]`` into each same-named student tensor that fits; return how
    many tensors were copied. Tensors without a counterpart keep their fresh initialisation."""
    source = teacher.state_dict()
    copied = 0
    for name, target in student.state_dict().items():
        origin = source.get(name)
        if origin is None or origin.dim() != target.dim():
            continue
        if any(t > o for t, o in zip(target.shape, origin.shape, strict=True)):
            continue
        target.copy_(origin[tuple(slice(0, n) for n in target.shape)])
        copied += 1
    return copied


def is_teacher_shaped(task: Task, recipe: Recipe) -> bool:
    """True when the student is the teacher's architecture started from its weights."""
    return recipe.student == dict(task.teacher_kwargs) and recipe.student_init == "slice"
