"""What a task is: a model factory whose keyword arguments are the student knobs, data, a teacher."""

from __future__ import annotations

import functools
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
from slimsearch.tasks.attention import unpack_attention
from slimsearch.tasks.data import (
    Data,
    DataSource,
    Inputs,
    Split,
    as_data,
    call_model,
    describe,
    map_inputs,
    output_tensor,
)
from slimsearch.tasks.metrics import Metric, resolve_metrics

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


def kept_layers(depth: int, total: int) -> list[int]:
    """Which of ``total`` layers a ``depth``-layer model starts from: spread evenly, the last
    always kept (3 of 6: 1, 3, 5, DistilBERT's every other layer)."""
    if not 1 <= depth <= total:
        raise ValueError(f"depth = {depth}: expected 1 to {total}")
    step = total / depth
    return [int(round((i + 1) * step)) - 1 for i in range(depth)]


@dataclass(frozen=True)
class Vocabulary:
    """Where a task's model reads token ids, so that the search may keep only the embedding
    rows of the tokens its training split uses (``space.vocabulary = ["seen", ...]``,
    ``compression.vocabulary``).

    ``input``: the model input holding the ids (a dict key such as ``"input_ids"``, or a
    position); ``unknown``: the id of the tokenizer's unknown token ([UNK]), whose row every
    token that was not kept reads; ``keep``: ids kept even when training never uses them
    (the special tokens: [PAD], [CLS], [SEP], [MASK])."""

    input: str | int
    unknown: int
    keep: tuple[int, ...] = ()


@dataclass(frozen=True)
class Task:
    """A model factory, its data and (optionally) a trained teacher.

    ``make_model(**knobs)`` builds the architecture; ``teacher_kwargs`` are the knob values of
    the teacher and ``student_choices`` the default choices the search explores per knob.
    When ``teacher`` is None slimsearch trains one on ``train`` (once per run, cached).
    The validation split is what the search selects on; ``test`` is only reported. Each split
    is a ``Split``, a torch ``Dataset`` or ``DataLoader``, or a function returning an
    iterable of batches (``slimsearch.tasks.data``); ``data(name)`` reads it.
    """

    name: str
    make_model: Callable[..., nn.Module]
    teacher_kwargs: Mapping[str, Any]
    student_choices: Mapping[str, tuple[Any, ...]]
    train: DataSource
    val: DataSource
    test: DataSource
    teacher: nn.Module | None = None
    description: str = ""
    extras: Mapping[str, Any] = field(default_factory=dict)
    #: What the search scores models by: names of ``tasks.metrics.BUILT_IN`` (scikit-learn's
    #: scorer names) or ``slimsearch.metric(...)`` objects; the first is the objective.
    metrics: Sequence[str | Metric] = ("accuracy",)
    #: Where the model reads token ids (a text model): lets the search prune its vocabulary.
    vocabulary: Vocabulary | None = None

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
        resolve_metrics(self.metrics, where=f"task {self.name!r}: metrics")
        for split in SPLITS:
            as_data(getattr(self, split), split)  # a form slimsearch reads, or the message
        splits = [getattr(self, split) for split in SPLITS]
        if all(isinstance(s, Split) for s in splits):
            for split in ("val", "test"):
                shape = tuple(getattr(self, split).x.shape[1:])
                if shape != tuple(self.train.x.shape[1:]):
                    raise ConfigError(f"task {self.name!r}: the {split} split's samples have "
                                      f"shape {shape}, the train split's "
                                      f"{tuple(self.train.x.shape[1:])}; every split must hold "
                                      "samples of one shape")

    @functools.cached_property
    def scores(self) -> tuple[Metric, ...]:
        """The task's metrics; the first (``metric``) is the search's accuracy objective."""
        return resolve_metrics(self.metrics, where=f"task {self.name!r}: metrics")

    @property
    def metric(self) -> Metric:
        return self.scores[0]

    def build_model(self, **knobs: Any) -> nn.Module:
        """``make_model(**knobs)`` as slimsearch compresses it: each ``nn.MultiheadAttention``
        replaced by the equivalent ``HeadAttention`` (``tasks.attention``), whose q, k, v and
        output projections are Linear layers every method reaches. The teacher is kept as the
        user built it: it is the reference every speed-up is measured against."""
        model = self.make_model(**knobs)
        unpack_attention(model)
        return model

    def data(self, split: str) -> Data:
        """Split ``split`` (``"train"``, ``"val"`` or ``"test"``) as slimsearch reads it."""
        return as_data(getattr(self, split), split)

    def check_data(self) -> None:
        """``ConfigError`` before any training when a split's batches are not ``(inputs,
        targets)`` of tensors the teacher's model takes, or the targets do not fit the
        metric: class indices that are not one of the model's outputs (a label past them
        would fail the first epoch, or silently never be predicted), or regression targets
        that are not floats of the outputs' shape."""
        model = self.teacher if self.teacher is not None else self.make_model(**self.teacher_kwargs)
        was_training = model.training
        example = self.example_inputs(1)
        try:
            with torch.no_grad():
                outputs = output_tensor(call_model(model.eval(), example))
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"task {self.name!r}: the teacher's model fails on a batch of the "
                              f"train split ({describe(example)}): {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}. Give inputs "
                              "the model's forward takes: a tensor, a tuple (positional "
                              "arguments) or a dict (keyword arguments)") from exc
        finally:
            model.train(was_training)
        classes = outputs.shape[-1]
        for split in SPLITS:
            targets = self.data(split).targets()
            if self.metric.kind == "regression":
                self._check_regression(split, targets, outputs)
                continue
            if (targets.dim() != 1 or targets.is_floating_point() or targets.is_complex()
                    or targets.dtype == torch.bool):
                raise ConfigError(f"task {self.name!r}: the {split} split's targets are "
                                  f"{describe(targets)}, but metric {self.metric.label!r} "
                                  "scores class indices: a 1-D tensor of integers, one per "
                                  "sample. Give torch.as_tensor(labels, dtype=torch.long) "
                                  "(squeeze an N x 1 column with .squeeze(1)), or a regression "
                                  "metric such as 'neg_mean_squared_error' in the task's metrics")
            top, low = int(targets.max()), int(targets.min())
            if low < 0 or top >= classes:
                raise ConfigError(f"task {self.name!r}: the {split} split has label "
                                  f"{low if low < 0 else top}, but the teacher's model gives "
                                  f"{classes} outputs (classes 0 to {classes - 1}). Map the "
                                  f"labels to 0..{classes - 1}, or give the model one output "
                                  "per class")
        model.eval()
        try:
            self._check_metrics(model)
        finally:
            model.train(was_training)

    def _check_metrics(self, model: nn.Module) -> None:
        """Every metric scores the model's outputs on the validation split (an untrained
        model's: a metric that cannot score them, say binary ``f1`` on ten classes, fails
        here, before any training, not at the teacher's first measurement)."""
        outputs, targets = [], []
        with torch.no_grad():
            for inputs, y, _ in self.data("val").batches():
                outputs.append(output_tensor(call_model(model, inputs)).float())
                targets.append(y)
        found, wanted = torch.cat(outputs), torch.cat(targets)
        for metric in self.scores:
            try:
                metric.score(found, wanted)
            except Exception as exc:  # scikit-learn's and the user's functions raise anything
                raise ConfigError(f"task {self.name!r}: metric {metric.label!r} cannot score "
                                  f"the model's outputs ({describe(found)}) against the val "
                                  f"split's targets ({describe(wanted)}): {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}. Choose a "
                                  "metric that fits the targets (e.g. 'f1_macro' for more than "
                                  "two classes)") from exc

    def _check_regression(self, split: str, targets: torch.Tensor,
                          outputs: torch.Tensor) -> None:
        """A regression's targets are floats shaped as one sample's outputs (or, for one
        output, a vector)."""
        per_sample = tuple(targets.shape[1:])
        fits = per_sample == tuple(outputs.shape[1:]) or (per_sample == ()
                                                          and tuple(outputs.shape[1:]) == (1,))
        if not targets.is_floating_point() or not fits:
            raise ConfigError(f"task {self.name!r}: metric {self.metric.label!r} scores a "
                              f"regression, but the {split} split's targets are "
                              f"{describe(targets)} and the model gives {describe(outputs)} "
                              "per batch: give float targets with one value per output "
                              "(torch.as_tensor(y, dtype=torch.float32)), or a "
                              "classification metric such as 'accuracy'")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, without the batch dimension (a tensor input's)."""
        example = self.example_inputs(1)
        if not isinstance(example, torch.Tensor):
            raise TypeError(f"task {self.name!r} takes {describe(example)}, not one tensor")
        return tuple(example.shape[1:])

    def example_inputs(self, batch_size: int = 1) -> Inputs:
        """The first ``batch_size`` training inputs, repeated when the split has fewer (real
        data, for tracing and timing); a copy of the batch read the first time (a user's
        DataLoader may start worker processes for every pass)."""
        if batch_size not in self._examples:
            self._examples[batch_size] = self.data("train").example(batch_size)
        return map_inputs(self._examples[batch_size], torch.clone)

    @functools.cached_property
    def _examples(self) -> dict[int, Inputs]:
        return {}

    @functools.cached_property
    def calibration_inputs(self) -> Inputs:
        """The first CALIBRATION_SAMPLES training inputs, which static int8 calibrates its
        activation ranges on (read once, when a static int8 plan first asks)."""
        return self.data("train").head(CALIBRATION_SAMPLES)[0]


SPLITS = ("train", "val", "test")
#: Training samples a static int8 plan calibrates its activation ranges on.
CALIBRATION_SAMPLES = 512
