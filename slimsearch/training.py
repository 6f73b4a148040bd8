"""The training loop shared by the teacher, distillation, fine-tuning and QAT.

One loop, plain mini-batch SGD with Adam: the data sets here are small tensors that fit in
memory, so there is no DataLoader. With ``teacher_logits`` the loss is knowledge distillation
(Hinton et al.): ``alpha * T^2 * KL(student_T || teacher_T) + (1 - alpha) * CE(labels)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.errors import TrialError
from slimsearch.tasks._base import Split


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                      *, temperature: float, alpha: float) -> torch.Tensor:
    """Weighted sum of the softened KL term (scaled by T^2) and cross-entropy on labels."""
    t = temperature
    kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    return alpha * kd + (1.0 - alpha) * F.cross_entropy(logits, labels)


def fit(model: nn.Module, data: Split, *, epochs: int, lr: float, batch_size: int, seed: int,
        device: torch.device, weight_decay: float = 0.0, teacher_logits: torch.Tensor | None = None,
        temperature: float = 4.0, alpha: float = 0.7,
        after_step: Callable[[], None] | None = None, hint: nn.Module | None = None,
        before_epoch: Callable[[int], None] | None = None) -> float:
    """Train ``model`` in place for ``epochs`` epochs; return the last epoch's mean loss.

    ``after_step`` runs after every optimiser step (pruning uses it to keep zeros at zero);
    ``before_epoch(epoch)`` before every epoch (the run's deadline stops a trial there).
    ``hint`` (a ``compression.distill.FeatureHint``) adds its feature loss and trains its
    projection along with the model.
    Raises ``TrialError`` when the loss stops being finite, so the search records why.
    """
    if epochs == 0:
        return float("nan")
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    parameters = list(model.parameters())
    if hint is not None:
        hint.to(device)
        parameters += list(hint.parameters())
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    x, y = data.x.to(device), data.y.to(device)
    soft = teacher_logits.to(device) if teacher_logits is not None else None
    mean_loss = float("nan")
    for epoch in range(epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        order = torch.randperm(len(y), generator=generator).to(device)
        total, batches = 0.0, 0
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            logits = model(x[idx])
            if soft is None:
                loss = F.cross_entropy(logits, y[idx])
            else:
                loss = distillation_loss(logits, y[idx], soft[idx], temperature=temperature,
                                         alpha=alpha)
            if hint is not None:
                loss = loss + hint.loss(idx)
            if not torch.isfinite(loss):
                raise TrialError(f"training loss became {loss.item()} at epoch {epoch + 1}/{epochs}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += loss.item()
            batches += 1
        mean_loss = total / batches
    model.eval()
    if not math.isfinite(mean_loss):
        raise TrialError(f"training loss is {mean_loss}")
    return mean_loss


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, *, device: torch.device,
                   batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode, computed in batches, returned on the CPU."""
    model.to(device).eval()
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, data: Split, *, device: torch.device) -> float:
    """Top-1 accuracy on ``data`` as a fraction 0-1.

    On CUDA, TF32 is switched off while evaluating: with it, the same model file can classify
    a borderline sample differently from one process (or GPU) to the next."""
    with full_fp32():
        predictions = predict_logits(model, data.x, device=device).argmax(dim=1)
    return float((predictions == data.y).float().mean())


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
