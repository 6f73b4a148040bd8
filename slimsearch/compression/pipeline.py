"""The ordered compression pipeline for one recipe.

    student (its vocabulary pruned) -> distill -> prune (structured, then unstructured)
    -> fine-tune -> quantize (QAT; embedding tables too)

Every stage works on the real model: vocabulary pruning leaves a smaller token table,
structured pruning leaves smaller layers, unstructured pruning leaves real zeros,
quantization leaves weights that are exactly ``codes * scale``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimsearch.compression.artifact import CompressedModel
from slimsearch.compression.distill import FeatureHint, LayerHints
from slimsearch.compression.pruning import SPARSITY_PATTERNS, apply_masks, prune_structured
from slimsearch.compression.quantization import (
    attach_fake_quant,
    detach_fake_quant,
    quantize_layers_,
)
from slimsearch.compression.student import build_student, is_teacher_shaped, mapped_blocks
from slimsearch.compression.vocabulary import prune_vocabulary
from slimsearch.errors import TrialStopped
from slimsearch.experiment import TrainConfig
from slimsearch.spaces import COMPRESSIBLE, Recipe, compressible_layers
from slimsearch.tasks import Task, factory_path
from slimsearch.training import TeacherTargets, fit


def _layers(model: nn.Module, recipe: Recipe) -> dict[str, nn.Module]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE)}
    unknown = sorted(set(recipe.layers) - set(found))
    if unknown:
        raise ValueError(f"recipe names layers {unknown} that the student does not have; "
                         f"its layers: {sorted(found)}")
    return found


@dataclass
class _Stages:
    """What every training stage of one build shares (the task's train split, the teacher's
    logits as distillation targets, the run's optimiser settings, the checks before each
    epoch), and the record of the stages done so far."""

    task: Task
    teacher: TeacherTargets
    train: TrainConfig
    seed: int
    device: torch.device
    temperature: float
    alpha: float
    deadline: float | None
    check: Callable[[nn.Module, str, int, int], None] | None
    record: dict[str, Any] = field(default_factory=lambda: {"stages": {}})
    clock: float = field(default_factory=time.perf_counter)

    def done(self, name: str, **info: Any) -> None:
        """Record stage ``name`` with its seconds since the stage before and ``info``."""
        now = time.perf_counter()
        self.record["stages"][name] = {"seconds": round(now - self.clock, 3), **info}
        self.clock = now

    def tune(self, model: nn.Module, epochs: int, after_step: Any = None,
             hint: FeatureHint | None = None, *, name: str,
             layer_hints: LayerHints | None = None, lr: float | None = None) -> float:
        """Train ``model`` for ``epochs`` against the teacher; the last epoch's loss."""
        def before_epoch(epoch: int) -> None:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise TrialStopped(f"the run's time budget ran out before epoch {epoch + 1}/"
                                   f"{epochs} of {name}", by_deadline=True)
            if self.check is not None:
                self.check(model, name, epoch, epochs)
        train = self.train
        return fit(model, self.task.data("train"), epochs=epochs, lr=lr or train.lr,
                   batch_size=train.batch_size, weight_decay=train.weight_decay, seed=self.seed,
                   device=self.device, teacher=self.teacher,
                   temperature=self.temperature, alpha=self.alpha, after_step=after_step,
                   hint=hint, before_epoch=before_epoch, layer_hints=layer_hints)


def build(task: Task, teacher: nn.Module, targets: TeacherTargets, recipe: Recipe, *,
          train: TrainConfig, seed: int, device: torch.device, round_to: int = 1,
          deadline: float | None = None,
          check: Callable[[nn.Module, str, int, int], None] | None = None) -> CompressedModel:
    """Run every stage of ``recipe`` and return the compressed model (CPU, eval mode).

    ``targets``: what the teacher gives each training batch (its outputs, and its head's
    inputs for the hint loss when the hint weight is > 0). ``round_to``: structured pruning
    keeps a multiple of this many channels per layer. ``deadline`` (``time.monotonic()`` seconds): a
    training stage that would start an epoch after it raises ``TrialStopped``. ``check(model,
    stage, epochs_done, stage_epochs)`` runs before each epoch and may stop the trial the same way."""
    distill_epochs = int(recipe.distillation.get("epochs", train.distill_epochs))
    hint_weight = float(recipe.distillation.get("hint_weight", train.hint_weight))
    hidden_weight = float(recipe.distillation.get("hidden_weight", train.hidden_weight))
    if hint_weight > 0 and targets.head_width is None:
        raise ValueError("a hint weight > 0 needs the teacher's head inputs (targets)")
    stages = _Stages(task, targets, train, seed, device,
                     temperature=float(recipe.distillation.get("temperature", train.temperature)),
                     alpha=float(recipe.distillation.get("alpha", train.alpha)),
                     deadline=deadline, check=check)
    model = build_student(task, teacher, recipe, seed=seed)
    layers = _layers(model, recipe)
    info: dict[str, Any] = {}
    if recipe.vocabulary == "seen":  # before training: a smaller table is cheaper to train
        if task.vocabulary is None:
            raise ValueError(f"vocabulary = 'seen': task {task.name!r} has no vocabulary "
                             "(where its model reads token ids)")
        info["vocabulary"] = prune_vocabulary(model, task.vocabulary, task.data("train"),
                                              task.example_inputs(1))
    stages.done("student", parameters=sum(p.numel() for p in model.parameters()), **info)
    if not is_teacher_shaped(task, recipe) and distill_epochs > 0:
        _distill(model, stages, epochs=distill_epochs, hint_weight=hint_weight,
                 hidden_weight=hidden_weight, teacher=teacher,
                 lr=float(recipe.distillation.get("lr", train.lr)))
    masks = _prune(model, layers, recipe, stages, round_to=round_to)
    quantized = _quantize(model, layers, recipe, stages, masks)
    if untouched := left_float(model, recipe):
        stages.record["left_float"] = untouched
    return CompressedModel(model=model, factory=factory_path(task.make_model),
                           kwargs=dict(recipe.student), quantized=quantized,
                           record=stages.record)


def left_float(model: nn.Module, recipe: Recipe) -> dict[str, int]:
    """Weight tensors (two or more dimensions) of ``model`` that no method of ``recipe``
    reaches, by name, with their sizes (elements): parameters of modules other than the
    Linear and Conv2d layers the model calls as modules, such as nn.MultiheadAttention's
    packed q/k/v projection and its out_proj (used as a weight, never called), embedding
    tables (unless the recipe stores them in fewer bits) and positional parameters. They are
    stored and run as they are, in float."""
    reached = set(recipe.layers)
    if recipe.embedding_bits < 32:
        reached |= {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {name: param.numel() for name, param in model.named_parameters()
            if param.dim() >= 2 and name.rpartition(".")[0] not in reached}


def _distill(model: nn.Module, stages: _Stages, *, epochs: int, hint_weight: float,
             hidden_weight: float, teacher: nn.Module, lr: float) -> None:
    """Train the student against the teacher's logits at learning rate ``lr`` (and, with a
    hint weight, its head's inputs through a learned projection; with a hidden weight, the
    hidden states of the teacher layers its layers started from, the teacher run on each
    batch)."""
    hint = layer_hints = None
    if hint_weight > 0:
        head = compressible_layers(model.eval(), stages.task.example_inputs(1))[-1].name
        hint = FeatureHint(model, head, stages.teacher.head_width, hint_weight)
    if hidden_weight > 0:
        if not all(p.device == stages.device for p in teacher.parameters()):
            teacher = copy.deepcopy(teacher).to(stages.device)
        layer_hints = LayerHints(model, teacher.eval(), mapped_blocks(model, teacher),
                                 hidden_weight, stages.task.example_inputs(1))
    try:
        loss = stages.tune(model, epochs, hint=hint, layer_hints=layer_hints,
                           name="distillation", lr=lr)
    finally:
        for extra in (hint, layer_hints):
            if extra is not None:
                extra.detach()
    stages.done("distill", epochs=epochs, lr=lr, temperature=stages.temperature,
                alpha=stages.alpha,
                hint_weight=hint_weight, hidden_weight=hidden_weight,
                mapped_layers=layer_hints.pairs if layer_hints is not None else None, loss=loss)


def _prune(model: nn.Module, layers: dict[str, nn.Module], recipe: Recipe, stages: _Stages, *,
           round_to: int) -> dict[str, torch.Tensor]:
    """Remove channels (structured), zero weights (unstructured, global, 2:4), fine-tune with
    the zeros held; return the masks that hold them."""
    task, train = stages.task, stages.train
    structured = {n: r.sparsity for n, r in recipe.layers.items()
                  if r.sparsity > 0 and r.pruning == "structured"}
    patterns = {method: {n: r.sparsity for n, r in recipe.layers.items()
                         if r.sparsity > 0 and r.pruning == method} for method in SPARSITY_PATTERNS}
    model.cpu().eval()
    channels = prune_structured(model, structured, task.example_inputs(1), round_to=round_to,
                                importance=recipe.importance,
                                gradient_batch=task.data("train").head(256))
    masks: dict[str, torch.Tensor] = {}
    for method, fractions in patterns.items():
        masks.update(SPARSITY_PATTERNS[method](layers, fractions))
    if structured or masks:
        info: dict[str, Any] = {"structured": channels, "zeroed": {
            n: round(1.0 - float(m.float().mean()), 4) for n, m in masks.items()}}
        if patterns["2:4"]:  # the zeros shrink the file; the kernel is the execution plan's choice
            info["2:4"] = {n: "stored sparse; executed on the 2:4 semi-structured kernel only on "
                              "CUDA where measured faster (see execution)" for n in patterns["2:4"]}
        if train.finetune_epochs > 0:
            info["loss"] = stages.tune(model, train.finetune_epochs,
                                       lambda: apply_masks(layers, masks), name="fine-tuning")
        stages.done("prune", epochs=train.finetune_epochs, **info)
    return masks


def _quantize(model: nn.Module, layers: dict[str, nn.Module], recipe: Recipe, stages: _Stages,
              masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Quantization-aware training where a layer has < 32 bits (the zeros held), then every
    layer's weights rounded to its bits; return the quantized weights by layer."""
    bits = {n: r.bits for n, r in recipe.layers.items()}
    if recipe.embedding_bits < 32:  # the tables, stored in fewer bits (they run in float)
        tables = {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
        layers = {**layers, **tables}
        bits.update(dict.fromkeys(tables, recipe.embedding_bits))
    symmetric = recipe.weight_scheme == "symmetric"
    if any(b < 32 for b in bits.values()) and stages.train.qat_epochs > 0:
        attach_fake_quant(layers, bits, symmetric=symmetric)
        try:
            loss = stages.tune(model, stages.train.qat_epochs, lambda: apply_masks(layers, masks),
                               name="quantization-aware training")
        finally:
            detach_fake_quant(layers)
        stages.done("qat", epochs=stages.train.qat_epochs, loss=loss)
    model.cpu().eval()
    quantized = quantize_layers_(layers, bits, symmetric=symmetric)
    stages.done("quantize", bits={n: b for n, b in bits.items() if b < 32})
    return quantized
