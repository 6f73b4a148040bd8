"""The score a search optimises, and the others it reports: scikit-learn's metrics by name, or
the user's own function.

A metric scores a model's outputs on a whole split against its targets: ``(outputs,
targets) -> float``, outputs as the model gives them (logits for a classifier, one column or
a vector for a regressor; ``tasks.data.output_tensor``) and targets as the split holds
them. Scores are oriented as scikit-learn's scorers are: higher is better, so a metric where
lower is better is negated and named ``neg_<name>`` (``neg_mean_squared_error``). A task's
first metric is the search's accuracy objective (``val_accuracy``/``test_accuracy`` in a
trial's record hold its score); every one is reported as ``val_score_<name>``.

A metric's ``kind`` says what it scores: ``classification`` (integer class indices, 1-D) or
``regression`` (float targets). Training follows the targets: cross-entropy (and soft
cross-entropy against the teacher) for class indices, mean squared error (against the
targets and the teacher's outputs) for floats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn import metrics as sk

from slimsearch.errors import ConfigError, did_you_mean

KINDS = ("classification", "regression")


@dataclass(frozen=True)
class Metric:
    """A score of a model's outputs on a split (see the module's doc).

    ``fn(outputs, targets) -> float`` as named; ``greater_is_better`` False negates it into
    the score (and names it ``neg_<name>``); ``fraction``: the value lies in 0-1, so a drop
    is shown in points (x100), else in the metric's own units."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], float]
    greater_is_better: bool = True
    kind: str = "classification"
    fraction: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"metric {self.name!r}: kind = {self.kind!r}; use one of {KINDS}")
        if not callable(self.fn):
            raise ConfigError(f"metric {self.name!r}: fn must be a function (outputs, targets) "
                              "-> float")

    @property
    def label(self) -> str:
        """The score's name: ``name``, or ``neg_<name>`` where lower is better."""
        return self.name if self.greater_is_better else f"neg_{self.name}"

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The score of ``outputs`` against ``targets`` (higher is better)."""
        value = float(self.fn(outputs, targets))
        return value if self.greater_is_better else -value


def metric(fn: Callable[[torch.Tensor, torch.Tensor], float], *, name: str,
           greater_is_better: bool = True, kind: str = "classification",
           fraction: bool = False) -> Metric:
    """A metric of your own: ``fn(outputs, targets) -> float`` over a whole split."""
    return Metric(name, fn, greater_is_better, kind, fraction)


def _top1(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    # in float32 on the tensors, as slimsearch measured accuracy before metrics had names:
    # a bundle exported from an earlier run verifies to the same number
    return float((outputs.argmax(dim=1) == targets).float().mean())


def _labels(outputs: torch.Tensor) -> np.ndarray:
    return outputs.argmax(dim=1).numpy()


def _probabilities(outputs: torch.Tensor) -> np.ndarray:
    return torch.softmax(outputs.double(), dim=1).numpy()


def _roc_auc(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    p = _probabilities(outputs)
    if p.shape[1] == 2:  # binary: the positive class's probability
        return sk.roc_auc_score(targets.numpy(), p[:, 1])
    return sk.roc_auc_score(targets.numpy(), p, multi_class="ovr", labels=range(p.shape[1]))


def _classification(fn: Callable[..., float], **kwargs: Any) -> Callable[..., float]:
    return lambda outputs, targets: fn(targets.numpy(), _labels(outputs), **kwargs)


def _column(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Outputs shaped as the targets (a regressor's N x 1 column against N targets)."""
    if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1:
        outputs = outputs.squeeze(-1)
    return targets.double().numpy(), outputs.double().numpy()


def _regression(fn: Callable[..., float]) -> Callable[..., float]:
    return lambda outputs, targets: fn(*_column(outputs, targets))


def _rmse(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.sqrt(sk.mean_squared_error(y, p)))


#: scikit-learn's scorer names slimsearch computes from a model's outputs, by name.
BUILT_IN: dict[str, Metric] = {m.label: m for m in (
    Metric("accuracy", _top1, fraction=True),
    Metric("balanced_accuracy", _classification(sk.balanced_accuracy_score), fraction=True),
    Metric("f1", _classification(sk.f1_score), fraction=True),
    *(Metric(f"{kind}_{average}", _classification(fn, average=average, zero_division=0),
             fraction=True)
      for kind, fn in (("f1", sk.f1_score), ("precision", sk.precision_score),
                       ("recall", sk.recall_score))
      for average in ("macro", "micro", "weighted")),
    Metric("matthews_corrcoef", _classification(sk.matthews_corrcoef)),
    Metric("roc_auc", _roc_auc, fraction=True),
    Metric("log_loss", lambda o, t: sk.log_loss(t.numpy(), _probabilities(o),
                                                labels=range(o.shape[1])),
           greater_is_better=False),
    Metric("mean_squared_error", _regression(sk.mean_squared_error), greater_is_better=False,
           kind="regression"),
    Metric("root_mean_squared_error", _regression(_rmse), greater_is_better=False,
           kind="regression"),
    Metric("mean_absolute_error", _regression(sk.mean_absolute_error), greater_is_better=False,
           kind="regression"),
    Metric("r2", _regression(sk.r2_score), kind="regression"),
)}


def is_fraction(metrics: dict[str, Any]) -> bool:
    """Whether a record's objective (its ``metric`` and ``metric_fraction``; a record from
    before metrics had names scored accuracy) lies in 0-1, so that drops read in points."""
    return bool(metrics.get("metric_fraction", metrics.get("metric", "accuracy") == "accuracy"))


def drop_text(drop: float, metrics: dict[str, Any]) -> str:
    """A drop in the objective as a person reads it: points (x100) for a fraction, else in the
    metric's own units (the line it goes in names the metric)."""
    if is_fraction(metrics):
        return f"{drop * 100:.2f} points"
    return f"{drop:.4g}"


def resolve_metrics(specs: Sequence[str | Metric], *, where: str) -> tuple[Metric, ...]:
    """``specs`` (names of ``BUILT_IN`` or ``Metric`` objects) as metrics, one kind, no
    repeats; ``ConfigError`` naming ``where`` (the field) otherwise."""
    if isinstance(specs, str | Metric) or not specs:
        raise ConfigError(f"{where}: give a list of at least one metric, e.g. ['accuracy'] or "
                          "['f1_macro', 'accuracy'] (the first is the search's objective)")
    found: list[Metric] = []
    for spec in specs:
        if isinstance(spec, Metric):
            found.append(spec)
        elif isinstance(spec, str) and spec in BUILT_IN:
            found.append(BUILT_IN[spec])
        else:
            raise ConfigError(f"{where}: {spec!r} is not a metric slimsearch knows."
                              f"{did_you_mean(str(spec), BUILT_IN)} Names: "
                              f"{', '.join(BUILT_IN)}; or slimsearch.metric(fn, name=...) for "
                              "your own (outputs, targets) -> float")
    labels = [m.label for m in found]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: {labels} names a metric twice")
    kinds = {m.kind for m in found}
    if len(kinds) > 1:
        raise ConfigError(f"{where}: {labels} mixes classification and regression metrics; a "
                          "task's targets are one or the other")
    return tuple(found)
