"""The student: the task's model built with the recipe's knobs, started from the teacher or fresh."""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimsearch.spaces import Recipe
from slimsearch.tasks import Task, kept_layers
from slimsearch.tasks.attention import attention_blocks, unpack_attention


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


def mapped_blocks(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
    """Each block of the student's transformer stacks (an ``nn.ModuleList`` of identically
    shaped blocks that hold attention, in the teacher) -> the teacher block it starts from
    (``spread_blocks``; block i <- block i at the same depth), by module name: the pairs
    hidden-state distillation compares."""
    if any(isinstance(m, nn.MultiheadAttention) for m in teacher.modules()):
        teacher = copy.deepcopy(teacher)  # read as the student is built; the names stay
        unpack_attention(teacher)
    pairs = {}
    sources = dict(teacher.named_modules())
    renames = spread_blocks(student, teacher)
    for name, stack in student.named_modules():
        source = sources.get(name)
        if not (isinstance(stack, nn.ModuleList) and isinstance(source, nn.ModuleList)
                and 0 < len(stack) <= len(source) and attention_blocks(source[0])):
            continue
        shapes = [[(n, p.shape) for n, p in block.named_parameters()] for block in source]
        if any(s != shapes[0] for s in shapes):
            continue
        prefix = f"{name}." if name else ""
        for j in range(len(stack)):
            pairs[f"{prefix}{j}"] = renames.get(f"{prefix}{j}.", f"{prefix}{j}.").rstrip(".")
    return pairs


def spread_blocks(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
    """Where a stack of transformer layers (an ``nn.ModuleList`` of blocks that hold
    attention and all have the same parameter shapes) is shallower in the student, which
    teacher layer each student layer starts from: spread evenly over the teacher's depth, the
    last kept (``kept_layers``; 3 of 6: 1, 3, 5, DistilBERT's every other layer). As name
    prefixes, student's -> teacher's. Other stacks (an MLP's layers, a ResNet stage's blocks)
    keep block i from block i."""
    renames = {}
    sources = dict(teacher.named_modules())
    for name, stack in student.named_modules():
        source = sources.get(name)
        if not (isinstance(stack, nn.ModuleList) and isinstance(source, nn.ModuleList)
                and 0 < len(stack) < len(source)):
            continue
        shapes = [[(n, p.shape) for n, p in block.named_parameters()] for block in source]
        if any(s != shapes[0] for s in shapes) or not attention_blocks(source[0]):
            continue
        prefix = f"{name}." if name else ""
        for j, i in enumerate(kept_layers(len(stack), len(source))):
            renames[f"{prefix}{j}."] = f"{prefix}{i}."
    return renames


@torch.no_grad()
def copy_leading_slices(student: nn.Module, teacher: nn.Module) -> int:
    """Copy ``teacher[:n, :m, ...]`` into each same-named student tensor that fits; return how
    many tensors were copied. Tensors without a counterpart keep their fresh initialisation.
    A shallower stack of identical blocks takes its blocks spread over the teacher's
    (``spread_blocks``)."""
    source = teacher.state_dict()
    renames = spread_blocks(student, teacher)
    copied = 0
    for name, target in student.state_dict().items():
        prefix = next((p for p in renames if name.startswith(p)), None)
        origin = source.get(name if prefix is None else renames[prefix] + name[len(prefix):])
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
