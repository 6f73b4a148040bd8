"""The trained teacher: trained once per run on the train split, cached in the run folder.

The cache holds the weights and the teacher's logits on the train split (the distillation
targets every trial reuses), keyed by everything that changes them.
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
from slimsearch.training import fit, predict_logits


@dataclass(frozen=True)
class Teacher:
    """The teacher model (eval mode, on the CPU, rebuilt from its model file when cached) and
    its logits on the train split."""

    model: nn.Module
    train_logits: torch.Tensor
    trained_here: bool
    #: The inputs of the teacher's classifier head on the train split (for hint distillation).
    train_features: torch.Tensor | None = None


def _digest(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def prepare_teacher(task: Task, train: TrainConfig, *, seed: int, cache_dir: Path,
                    device: torch.device) -> Teacher:
    """Load the cached teacher from ``cache_dir`` or train (or take the task's) and cache it."""
    # Everything the cached weights and logits depend on; the data itself by hash, since a
    # plug-in could change its split and misalign the cached logits with the samples.
    key = {"task": task.name, "seed": seed, "teacher_kwargs": dict(task.teacher_kwargs),
           "epochs": train.teacher_epochs, "lr": train.lr, "batch_size": train.batch_size,
           "weight_decay": train.weight_decay, "train_data": _digest([task.train.x, task.train.y]),
           "user_teacher": _digest(list(task.teacher.state_dict().values()))
           if task.teacher is not None else None,
           "torch": torch.__version__.split("+")[0], "cache_format": 2}  # 2: head features
    meta_path = cache_dir / "meta.json"
    if meta_path.exists() and read_json(meta_path).get("key") == key:
        model = load_float_model(cache_dir / MODEL_FILE)
        cached = load_file(cache_dir / "train_logits.safetensors")
        return Teacher(model, cached["logits"], trained_here=False,
                       train_features=cached.get("features"))

    if task.teacher is not None:
        model = task.make_model(**task.teacher_kwargs)
        model.load_state_dict(task.teacher.state_dict())
    else:
        torch.manual_seed(seed)
        model = task.make_model(**task.teacher_kwargs)
        fit(model, task.train, epochs=train.teacher_epochs, lr=train.lr,
            batch_size=train.batch_size, weight_decay=train.weight_decay, seed=seed, device=device)
    logits = predict_logits(model, task.train.x, device=device)
    head = compressible_layers(model.cpu().eval(), task.example_inputs(1))[-1].name
    features = head_inputs(model, head, task.train.x, device=device)
    model = model.cpu().eval()

    # Write into a temp folder and swap it in, so an interrupted run never leaves a torn cache.
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The teacher is stored in the same model format as every trial: it is measured the same way.
    save_artifact(CompressedModel(model, factory_path(task.make_model), dict(task.teacher_kwargs)),
                  tmp / MODEL_FILE)
    save_file({"logits": logits.contiguous(), "features": features.contiguous()},
              tmp / "train_logits.safetensors")
    write_json(tmp / "meta.json", {"key": key})
    shutil.rmtree(cache_dir, ignore_errors=True)
    tmp.rename(cache_dir)
    return Teacher(model, logits, trained_here=True, train_features=features)
