"""The training loop shared by the teacher, distillation, fine-tuning and QAT.

One loop, plain mini-batch SGD with Adam, over the batches of a task's training split
(``tasks.data``: tensors in memory, a Dataset, or the user's own DataLoader). The loss
follows the targets: cross-entropy for class indices, mean squared error for float
(regression) targets. With a teacher it is knowledge distillation (Hinton et al.):
``alpha * T^2 * KL(student_T || teacher_T) + (1 - alpha) * CE(labels)``, or for a regression
``alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, targets)``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.errors import TrialError
from slimsearch.tasks.data import (
    Data,
    DataSource,
    Inputs,
    Split,
    as_data,
    call_model,
    inputs_to,
    output_tensor,
)
from slimsearch.tasks.metrics import BUILT_IN, Metric


def supervised_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class indices; mean squared error against float targets (a
    regressor's N x 1 column against N targets)."""
    if not targets.is_floating_point():
        return F.cross_entropy(outputs, targets.long())
    if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1:
        outputs = outputs.squeeze(-1)
    return F.mse_loss(outputs, targets.to(outputs.dtype))


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                      *, temperature: float, alpha: float) -> torch.Tensor:
    """Weighted sum of the softened KL term (scaled by T^2) and cross-entropy on labels; for
    float (regression) targets, of the squared distance to the teacher's outputs and to the
    targets (the temperature does not apply)."""
    if labels.is_floating_point():
        return (alpha * F.mse_loss(logits, teacher_logits)
                + (1.0 - alpha) * supervised_loss(logits, labels))
    t = temperature
    kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    return alpha * kd + (1.0 - alpha) * F.cross_entropy(logits, labels)


@dataclass(frozen=True)
class TeacherTargets:
    """What the teacher gives each training batch: its outputs (the distillation targets) and
    the inputs of its classifier head (the hint targets).

    On a split slimsearch batches itself (a ``Split``, a ``Dataset`` with a length) they are
    computed once and looked up by sample (``logits``, ``features``: one row per sample of
    the split); on any other split (a DataLoader, an iterable, a callable), whose order
    slimsearch does not know, the teacher (``model``, its head named ``head``) runs on each
    batch instead."""

    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    model: nn.Module | None = None
    head: str | None = None
    #: These targets made for other devices (``to``), by device.
    _placed: dict[str, TeacherTargets] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.logits is None and self.model is None:
            raise ValueError("TeacherTargets needs the teacher's logits or the teacher")

    def on(self, inputs: Inputs, index: torch.Tensor | None,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, head inputs or None) of the samples ``index`` of the split, or of
        ``inputs`` (already on ``device``) when they were not computed once."""
        if index is not None and self.logits is not None:
            features = (self.features[index].to(device) if self.features is not None
                        else None)
            return self.logits[index].to(device), features
        if self.model is None:
            raise ValueError("the teacher's outputs were computed once on the split; "
                             "this batch has no sample index into it")
        captured: list[torch.Tensor] = []
        hook = (self.model.get_submodule(self.head).register_forward_pre_hook(
            lambda _m, args: captured.append(args[0].flatten(1)))
            if self.head is not None else None)
        try:
            with torch.no_grad():
                logits = output_tensor(call_model(self.model, inputs)).float()
        finally:
            if hook is not None:
                hook.remove()
        return logits, (captured[0].float() if captured else None)

    @property
    def head_width(self) -> int | None:
        """How many features the teacher's head takes (the hint's target width)."""
        if self.features is not None:
            return int(self.features.shape[1])
        if self.model is not None and self.head is not None:
            return int(self.model.get_submodule(self.head).weight[0].numel())
        return None

    def to(self, device: torch.device) -> TeacherTargets:
        """These targets on ``device`` (the teacher in eval mode, if it runs per batch), made
        once per device: a copy where they have to move, so that the caller's teacher stays
        where it is."""
        key = str(device)
        if key not in self._placed:
            def there(t: torch.Tensor | None) -> torch.Tensor | None:
                return t if t is None or _on(t.device, device) else t.to(device)
            model = self.model
            if model is not None and not all(_on(p.device, device) for p in model.parameters()):
                model = copy.deepcopy(model).to(device)
            if model is not None:
                model.eval()
            self._placed[key] = TeacherTargets(there(self.logits), there(self.features), model,
                                               self.head)
        return self._placed[key]


def _on(where: torch.device, device: torch.device) -> bool:
    """Whether a tensor on ``where`` is on ``device`` (``cuda`` means the current one)."""
    return where.type == device.type and device.index in (None, where.index)


def fit(model: nn.Module, data: Data | DataSource, *, epochs: int, lr: float, batch_size: int,
        seed: int, device: torch.device, weight_decay: float = 0.0,
        teacher: TeacherTargets | None = None, temperature: float = 4.0, alpha: float = 0.7,
        after_step: Callable[[], None] | None = None, hint: nn.Module | None = None,
        before_epoch: Callable[[int], None] | None = None,
        layer_hints: nn.Module | None = None) -> float:
    """Train ``model`` in place for ``epochs`` epochs on ``data`` (a split; ``batch_size`` and
    the shuffling by ``seed`` apply where slimsearch batches it); return the last epoch's
    mean loss.

    ``teacher``: distill against its outputs. ``after_step`` runs after every optimiser step
    (pruning uses it to keep zeros at zero); ``before_epoch(epoch)`` before every epoch (the
    run's deadline stops a trial there). ``hint`` (a ``compression.distill.FeatureHint``)
    adds its feature loss on the teacher's head inputs and trains its projection along with
    the model; ``layer_hints`` (a ``compression.distill.LayerHints``) its loss on the hidden
    states of mapped layers, the same way. Raises ``TrialError`` when the loss stops being
    finite, so the search records why.
    """
    if epochs == 0:
        return float("nan")
    data = as_data(data, "train")
    if (split := data.in_memory) is not None and device.type != "cpu":
        # moved once, not batch by batch (the batches are then gathered on the device)
        data = Data(data.name, Split(split.x.to(device), split.y.to(device)))
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    parameters = list(model.parameters())
    for extra in (hint, layer_hints):
        if extra is not None:
            extra.to(device)
            parameters += [p for p in extra.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    teacher = teacher.to(device) if teacher is not None else None
    mean_loss = float("nan")
    for epoch in range(epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        total, batches = 0.0, 0
        for inputs, y, index in data.batches(batch_size=batch_size, shuffle=generator):
            inputs = inputs_to(inputs, device)
            y = y.to(device) if y.is_floating_point() else y.to(device=device, dtype=torch.long)
            logits = output_tensor(call_model(model, inputs))
            if teacher is None:
                loss = supervised_loss(logits, y)
            else:
                soft, features = teacher.on(inputs, index, device)
                loss = distillation_loss(logits, y, soft, temperature=temperature, alpha=alpha)
                if hint is not None:
                    if features is None:
                        raise TrialError("hint distillation needs the teacher's head inputs")
                    loss = loss + hint.loss(features)
                if layer_hints is not None:
                    loss = loss + layer_hints.loss(inputs)
            if not torch.isfinite(loss):
                raise TrialError(f"training loss became {loss.item()} at epoch {epoch + 1}/{epochs}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += loss.item()
            batches += 1
        if batches == 0:
            raise TrialError(f"the training split gave no batch in epoch {epoch + 1}")
        mean_loss = total / batches
    model.eval()
    if not math.isfinite(mean_loss):
        raise TrialError(f"training loss is {mean_loss}")
    return mean_loss


@torch.inference_mode()
def predict(model: Callable[..., object], data: Data | DataSource, *,
            device: torch.device | None = None,
            batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, targets) of ``model`` over a split, in the split's order, on the CPU as
    float32 outputs; a module runs in eval mode on ``device``."""
    data = as_data(data, "data")
    if isinstance(model, nn.Module) and device is not None:
        model.to(device).eval()
    outputs, targets = [], []
    for inputs, y, _ in data.batches(batch_size=batch_size):
        if device is not None:
            inputs = inputs_to(inputs, device)
        outputs.append(output_tensor(call_model(model, inputs)).float().cpu())
        targets.append(y.cpu())
    return torch.cat(outputs), torch.cat(targets)


def predict_logits(model: nn.Module, data: Data | DataSource, *, device: torch.device,
                   batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` on a split in eval mode, computed in batches, on the CPU."""
    return predict(model, data, device=device, batch_size=batch_size)[0]


def score(model: nn.Module, data: Data | DataSource, metric: Metric, *,
          device: torch.device) -> float:
    """``metric``'s score (higher is better) of ``model`` on ``data``, TF32 off (see
    ``accuracy``)."""
    with full_fp32():
        outputs, targets = predict(model, data, device=device)
    return metric.score(outputs, targets)


def accuracy(model: nn.Module, data: Data | DataSource, *, device: torch.device) -> float:
    """Top-1 accuracy on ``data`` as a fraction 0-1.

    On CUDA, TF32 is switched off while evaluating: with it, the same model file can classify
    a borderline sample differently from one process (or GPU) to the next."""
    return score(model, data, BUILT_IN["accuracy"], device=device)


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
