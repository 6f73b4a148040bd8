"""Feature distillation beside the logits: the student's features entering its classifier
head are pulled towards the teacher's (``FeatureHint``, the hint of FitNets, Romero et al.),
and the hidden states of a transformer student's layers towards those of the teacher layers
they started from (``LayerHints``, as TinyBERT does), each through a learned linear
projection where the widths differ.

The logit term lives in ``training.distillation_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.errors import TrialError
from slimsearch.tasks.data import Data, DataSource, Inputs, as_data, call_model, inputs_to


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


def _first_tensor(output: object) -> torch.Tensor:
    """A block's hidden states: its output, or the first element of a tuple output (Hugging
    Face layers return ``(hidden_states, ...)``)."""
    while isinstance(output, tuple | list):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TrialError(f"a mapped layer returned {type(output).__name__}, not hidden states")
    return output


class LayerHints(nn.Module):
    """While attached, remembers the output of each mapped student layer; ``loss(inputs)``
    runs the teacher on the same inputs (no gradients), remembering its mapped layers'
    outputs, and is ``weight`` times the mean over the pairs of the squared distance between
    the student's hidden states (projected where the widths differ) and the teacher's. The
    projections train with the student and are thrown away afterwards."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: dict[str, str],
                 weight: float, example: Inputs) -> None:
        super().__init__()
        if not pairs:
            raise TrialError("hidden-state distillation needs transformer layers the student "
                             "shares with the teacher; set hidden_weight to 0 for this model")
        self.weight, self.pairs = weight, dict(pairs)
        self._teacher_model = (teacher,)  # in a tuple: not a submodule, never trained
        self._student: dict[str, torch.Tensor] = {}
        self._teacher: dict[str, torch.Tensor] = {}
        self._hooks = [student.get_submodule(s).register_forward_hook(self._keep(self._student, s))
                       for s in pairs]
        self._hooks += [teacher.get_submodule(t).register_forward_hook(self._keep(self._teacher, t))
                        for t in pairs.values()]
        with torch.no_grad():  # the widths, from one batch, each model where it is
            for model in (student, teacher):
                call_model(model, inputs_to(example, next(model.parameters()).device))
        self.projections = nn.ModuleList(
            nn.Identity() if (ws := self._student[s].shape[-1]) == (wt := self._teacher[t].shape[-1])
            else nn.Linear(ws, wt, bias=False) for s, t in pairs.items())

    @staticmethod
    def _keep(store: dict[str, torch.Tensor], name: str):
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            store[name] = _first_tensor(output)
        return hook

    def loss(self, inputs: Inputs) -> torch.Tensor:
        with torch.no_grad():
            call_model(self._teacher_model[0], inputs)
        terms = [F.mse_loss(projection(self._student[s]), self._teacher[t].detach())
                 for projection, (s, t) in zip(self.projections, self.pairs.items(), strict=True)]
        return self.weight * torch.stack(terms).mean()

    def detach(self) -> None:
        """Remove the hooks from the student and the teacher."""
        for hook in self._hooks:
            hook.remove()
