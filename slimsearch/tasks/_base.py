"""What a task is: a model factory whose keyword arguments are the student knobs, data, a teacher."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimsearch.errors import ArtifactError, ConfigError

_FACTORY_MARK = "__slimsearch_model_factory__"


def model_factory(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Declare ``fn`` a model factory that ``load_model`` may call to rebuild an artifact.

    ``load_model`` imports the factory named in a model file; it refuses any callable that does
    not carry this mark, so a crafted file cannot make it call an arbitrary function.
    The factory must live at module level and take keyword arguments only (the student knobs).
    """
    setattr(fn, _FACTORY_MARK, True)
    return fn


def factory_path(fn: Callable[..., nn.Module]) -> str:
    """The ``"module:qualname"`` that ``resolve_factory`` imports back."""
    return f"{fn.__module__}:{fn.__qualname__}"


def resolve_factory(path: str, *, untrusted: Sequence[Path] = ()) -> Callable[..., nn.Module]:
    """Import a factory from ``"module:qualname"``; it must carry the ``model_factory`` mark.

    Importing a module runs its top level, before the mark can be checked. So a module not yet
    imported must not be found in one of the ``untrusted`` folders (``load_model`` passes the
    current directory and the model file's folder): a file that arrived with a bundle, or
    happens to lie where Python is started, must not run because a model file names it."""
    module_name, _, qualname = path.partition(":")
    _refuse_untrusted_location(module_name, untrusted, path)
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(f"cannot import the model factory {path!r}: {exc}. The module that "
                            "defines the model must be importable where the model is loaded.") from exc
    # `is True`, not truthiness: objects that invent attributes on request must not pass.
    if not callable(obj) or getattr(obj, _FACTORY_MARK, None) is not True:
        raise ArtifactError(f"{path!r} is not decorated with @slimsearch.model_factory; refusing to "
                            "call it to rebuild a model")
    return obj


def _refuse_untrusted_location(module_name: str, untrusted: Sequence[Path], path: str) -> None:
    """``ArtifactError`` when importing ``module_name`` would load its top-level package
    from one of the ``untrusted`` folders. An imported package (slimsearch, a plug-in task the
    run imported) is trusted: its submodules come from its own folder."""
    top = module_name.partition(".")[0]
    if not untrusted or not top or top in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return  # the import itself then fails with Python's own message
    if spec is None:
        return
    places = [p for p in list(spec.submodule_search_locations or []) or [spec.origin]
              if p and Path(p).is_absolute()]  # not built-in or frozen
    # the folders it was found in, not where a link there points: a link is a planted file too
    found = {Path(place).absolute().parent.resolve() for place in places}
    refused = {Path(folder).resolve() for folder in untrusted}
    if found & refused:
        found_in = next(iter(found & refused))
        raise ArtifactError(
            f"the model file names its factory {path!r}, whose module {top!r} would be imported "
            f"from {found_in} (the current directory or the model's own folder), where any file "
            "could have been put; refusing to run it. Install that module, put its folder on "
            f"PYTHONPATH, or import {top} yourself before load_model if you trust it")


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (float32, N x ...) and integer class labels ``y`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y) or len(self.x) == 0:
            raise ConfigError(f"a data split needs as many labels as inputs and at least one "
                              f"sample; got {len(self.x)} inputs and {len(self.y)} labels")
        if self.y.dim() != 1 or self.y.is_floating_point() or self.y.is_complex() \
                or self.y.dtype == torch.bool:
            raise ConfigError(f"a data split's labels y must be a 1-D tensor of integer class "
                              f"indices; got dtype {self.y.dtype} and shape {tuple(self.y.shape)}. "
                              "Map your labels to 0..classes-1 as torch.long, e.g. with "
                              "numpy.unique(labels, return_inverse=True)")
        if int(self.y.min()) < 0:
            raise ConfigError(f"a data split's labels y must be class indices from 0; found "
                              f"{int(self.y.min())}. Map your labels to 0..classes-1")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Task:
    """A model factory, its data and (optionally) a trained teacher.

    ``make_model(**knobs)`` builds the architecture; ``teacher_kwargs`` are the knob values of
    the teacher and ``student_choices`` the default choices the search explores per knob.
    When ``teacher`` is None slimsearch trains one on ``train`` (once per run, cached).
    The validation split is what the search selects on; ``test`` is only reported.
    """

    name: str
    make_model: Callable[..., nn.Module]
    teacher_kwargs: Mapping[str, Any]
    student_choices: Mapping[str, tuple[Any, ...]]
    train: Split
    val: Split
    test: Split
    teacher: nn.Module | None = None
    description: str = ""
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if getattr(self.make_model, _FACTORY_MARK, None) is not True:
            raise ConfigError(f"task {self.name!r}: make_model {factory_path(self.make_model)!r} "
                              "must be decorated with @slimsearch.model_factory so that exported "
                              "models can be rebuilt")
        if "<locals>" in self.make_model.__qualname__ or "<lambda>" in self.make_model.__qualname__:
            raise ConfigError(f"task {self.name!r}: make_model must be defined at module level "
                              f"(got {factory_path(self.make_model)!r})")
        unknown = set(self.student_choices) - set(self.teacher_kwargs)
        if unknown:
            raise ConfigError(f"task {self.name!r}: student_choices names knobs {sorted(unknown)} "
                              f"that teacher_kwargs does not set ({sorted(self.teacher_kwargs)})")
        for split in ("val", "test"):
            shape = tuple(getattr(self, split).x.shape[1:])
            if shape != self.input_shape:
                raise ConfigError(f"task {self.name!r}: the {split} split's samples have shape "
                                  f"{shape}, the train split's {self.input_shape}; every split "
                                  "must hold samples of one shape")

    def check_labels(self) -> None:
        """``ConfigError`` unless every label is one of the teacher's outputs (0 to outputs-1):
        a label past them would fail the first epoch, or silently never be predicted."""
        model = self.teacher if self.teacher is not None else self.make_model(**self.teacher_kwargs)
        was_training = model.training
        with torch.no_grad():
            outputs = model.eval()(self.example_inputs(1)).shape[-1]
        model.train(was_training)
        for split in ("train", "val", "test"):
            top = int(getattr(self, split).y.max())
            if top >= outputs:
                raise ConfigError(f"task {self.name!r}: the {split} split has label {top}, but the "
                                  f"teacher's model gives {outputs} outputs (classes 0 to "
                                  f"{outputs - 1}). Map the labels to 0..{outputs - 1}, or give "
                                  "the model one output per class")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, without the batch dimension."""
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.train.y.max(), self.val.y.max(), self.test.y.max())) + 1

    def example_inputs(self, batch_size: int = 1) -> torch.Tensor:
        """The first ``batch_size`` training inputs (real data, for tracing and timing)."""
        x = self.train.x
        reps = -(-batch_size // len(x))
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch_size].clone()
