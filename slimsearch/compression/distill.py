"""Feature (hint) distillation: the student's features entering its classifier head are pulled
towards the teacher's, through a learned linear projection (their widths differ).

The logit term lives in ``training.distillation_loss``; this adds the optional hint term of
FitNets (Romero et al.), on the one place every classifier has: the head's input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.errors import TrialError
from slimsearch.tasks.data import Data, DataSource, as_data, call_model, inputs_to


@torch.no_grad()
def head_inputs(model: nn.Module, head: str, data: Data | DataSource, *, device: torch.device,
                batch_size: int = 512) -> torch.Tensor:
    """The (flattened) inputs of layer ``head`` for every sample of a split, in its order, on
    the CPU."""
    captured: list[torch.Tensor] = []
    hook = model.get_submodule(head).register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].flatten(1).float().cpu()))
    try:
        model.to(device).eval()
        for inputs, _, _ in as_data(data, "train").batches(batch_size=batch_size):
            call_model(model, inputs_to(inputs, device))
    finally:
        hook.remove()
    return torch.cat(captured)


class FeatureHint(nn.Module):
    """While attached, remembers the student's head input each forward; ``loss(target)`` is
    ``weight * MSE(projection(features), target)``, the target being the teacher's head
    inputs on the same samples (``training.TeacherTargets``). Its projection is trained along
    with the student and thrown away afterwards."""

    def __init__(self, student: nn.Module, head: str, teacher_width: int,
                 weight: float) -> None:
        super().__init__()
        self.weight = weight
        layer = student.get_submodule(head)
        width = layer.in_features if isinstance(layer, nn.Linear) else None
        if width is None:
            raise TrialError(f"hint distillation needs a Linear classifier head; layer {head!r} is "
                             f"{type(layer).__name__}: set hint_weight to 0 for this model")
        self.projection = nn.Linear(width, teacher_width, bias=False)
        self._features: torch.Tensor | None = None
        self._hook = layer.register_forward_pre_hook(self._remember)

    def _remember(self, _module: nn.Module, args: tuple) -> None:
        self._features = args[0].flatten(1)

    def loss(self, target: torch.Tensor) -> torch.Tensor:
        return self.weight * F.mse_loss(self.projection(self._features), target)

    def detach(self) -> None:
        """Remove the hook from the student."""
        self._hook.remove()
