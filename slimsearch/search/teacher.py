"""The trained teacher: trained once per run on the train split, cached in the run folder.

The cache holds the weights and, for a train split slimsearch batches itself (a ``Split``
or a ``Dataset`` with a length), the teacher's logits and head inputs on it (the
distillation targets every trial reuses, computed once per run), keyed by everything that
changes them. On any other train split (a DataLoader, an iterable, a callable) the teacher
runs on each training batch instead (``training.TeacherTargets``): slimsearch does not know
its order.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimsearch.atomic import read_json, write_json
from slimsearch.compression.artifact import (
    MODEL_FILE,
    CompressedModel,
    load_float_model,
    save_artifact,
)
from slimsearch.compression.distill import head_inputs
from slimsearch.experiment import TrainConfig
from slimsearch.spaces import compressible_layers
from slimsearch.tasks._base import Task, factory_path
from slimsearch.training import TeacherTargets, fit, predict_logits


@dataclass(frozen=True)
class Teacher:
    """The teacher model (eval mode, on the CPU, rebuilt from its model file when cached) and
    what it gives each training batch as distillation targets."""

    model: nn.Module
    targets: TeacherTargets
    trained_here: bool


def _digest(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _targets(model: nn.Module, task: Task, head: str, *, device: torch.device,
             cache_dir: Path | None = None) -> TeacherTargets:
    """The teacher's targets: computed once on a train split slimsearch batches itself (read
    from ``cache_dir`` when given), else the teacher itself, run on each batch."""
    if not task.data("train").indexed:
        return TeacherTargets(model=model, head=head)
    if cache_dir is not None:
        cached = load_file(cache_dir / TARGETS_FILE)
        return TeacherTargets(logits=cached["logits"], features=cached.get("features"))
    train = task.data("train")
    return TeacherTargets(logits=predict_logits(model, train, device=device),
                          features=head_inputs(model, head, train, device=device))


TARGETS_FILE = "train_logits.safetensors"


def prepare_teacher(task: Task, train: TrainConfig, *, seed: int, cache_dir: Path,
                    device: torch.device) -> Teacher:
    """Load the cached teacher from ``cache_dir`` or train (or take the task's) and cache it."""
    # Everything the cached weights and logits depend on; the data itself by hash, since a
    # plug-in could change its split and misalign the cached logits with the samples.
    key = {"task": task.name, "seed": seed, "teacher_kwargs": dict(task.teacher_kwargs),
           "epochs": train.teacher_epochs, "lr": train.lr, "batch_size": train.batch_size,
           "weight_decay": train.weight_decay, "train_data": task.data("train").fingerprint(),
           "user_teacher": _digest(list(task.teacher.state_dict().values()))
           if task.teacher is not None else None,
           # 2: head features; 3: targets on Datasets too
           "torch": torch.__version__.split("+")[0], "cache_format": 3}
    meta_path = cache_dir / "meta.json"
    if meta_path.exists() and read_json(meta_path).get("key") == key:
        model = load_float_model(cache_dir / MODEL_FILE)
        head = compressible_layers(model, task.example_inputs(1))[-1].name
        return Teacher(model, _targets(model, task, head, device=device, cache_dir=cache_dir),
                       trained_here=False)

    if task.teacher is not None:
        model = task.make_model(**task.teacher_kwargs)
        model.load_state_dict(task.teacher.state_dict())
    else:
        torch.manual_seed(seed)
        model = task.make_model(**task.teacher_kwargs)
        fit(model, task.data("train"), epochs=train.teacher_epochs, lr=train.lr,
            batch_size=train.batch_size, weight_decay=train.weight_decay, seed=seed, device=device)
    head = compressible_layers(model.cpu().eval(), task.example_inputs(1))[-1].name
    targets = _targets(model, task, head, device=device)
    model = model.cpu().eval()

    # Write into a temp folder and swap it in, so an interrupted run never leaves a torn cache.
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The teacher is stored in the same model format as every trial: it is measured the same way.
    save_artifact(CompressedModel(model, factory_path(task.make_model), dict(task.teacher_kwargs)),
                  tmp / MODEL_FILE)
    if targets.logits is not None:
        save_file({"logits": targets.logits.contiguous(), "features": targets.features.contiguous()},
                  tmp / TARGETS_FILE)
    write_json(tmp / "meta.json", {"key": key})
    shutil.rmtree(cache_dir, ignore_errors=True)
    tmp.rename(cache_dir)
    return Teacher(model, targets, trained_here=True)
