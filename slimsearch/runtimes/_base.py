"""What a runtime is: it turns a model file into the executable form that is sized, timed and
exported, and says in a signature exactly what executes.

A runtime is an object with a ``name``, a ``label`` and three methods:

- ``check(target, device)``: raise ``ConfigError`` before any work when it cannot serve the
  target (not installed, wrong device or dtype);
- ``plan(model, recipe, target=..., device=..., batch=..., calibration=...)``: which layers of a
  compressed model run on which kernels, decided by timing them (``slimsearch.timing``), as
  plain data the model file stores; None to run the float layers as they are;
- ``materialize(model_file, target=..., device=..., example=..., out_dir=...) -> Executable``:
  the model file (with its plan) in the form this runtime executes and a deployment ships.

``RUNTIMES`` in ``slimsearch.runtimes`` registers them (``torch``, ``torchscript``,
``onnxruntime``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from slimsearch.experiment import TargetConfig
from slimsearch.spaces import Recipe
from slimsearch.tasks.data import Data, Inputs, batch_len, call_model, describe, take

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Executable:
    """A compressed model in the form a runtime executes it.

    ``artifact`` is the file a deployment ships (its length is the size objective); ``run``
    executes one batch given in the runtime's own input form, which ``native`` makes from a
    batch's CPU inputs (a tensor, a tuple or a dict of tensors, ``tasks.data``), and
    ``to_tensor`` takes the output tensor from what it returns; ``form`` describes what
    executes, layer by layer, for the latency cache.
    """

    runtime: str
    artifact: Path
    device: torch.device
    run: Callable[[Any], Any]
    native: Callable[[Inputs], Any]
    to_tensor: Callable[[Any], torch.Tensor]
    form: dict[str, Any]
    #: The torch module behind ``run`` (torch and torchscript runtimes), e.g. for CUDA graphs.
    module: nn.Module | None = None
    notes: list[str] = field(default_factory=list)

    @torch.inference_mode()
    def logits(self, x: Inputs, *, batch_size: int = 512) -> torch.Tensor:
        """Float32 CPU outputs of the executable on the inputs ``x``, computed in batches."""
        return torch.cat([self.to_tensor(self.run(self.native(take(x, slice(i, i + batch_size)))))
                          .float().cpu() for i in range(0, batch_len(x), batch_size)])

    def predict(self, data: Data, *, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, targets) of the executable over the split ``data``, in its order."""
        outputs, targets = [], []
        for inputs, y, _ in data.batches(batch_size=batch_size):
            outputs.append(self.logits(inputs, batch_size=batch_size))
            targets.append(y.cpu())
        return torch.cat(outputs), torch.cat(targets)

    def signature(self, batch_size: int) -> str:
        """A key for the latency of this executed form at ``batch_size``: equal keys run the
        same kernels on the same shapes (weights' values aside), so their latency is the same."""
        text = json.dumps({"form": self.form, "batch_size": batch_size}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class Runtime(Protocol):
    #: ``target.runtime``'s value for it, and how the report names it.
    name: str
    label: str

    def check(self, target: TargetConfig, device: torch.device) -> None: ...

    def plan(self, model: nn.Module, recipe: Recipe, *, target: TargetConfig,
             device: torch.device, batch: Inputs,
             calibration: Inputs | Callable[[], Inputs]) -> dict[str, Any] | None: ...

    def materialize(self, model_file: Path, *, target: TargetConfig, device: torch.device,
                    example: Inputs, out_dir: Path) -> Executable: ...


#: Numbers that a quantized layer's description carries but that do not change what runs.
_VALUES = re.compile(r"\b(scale|zero_point)=[^,)]*(, )?")


def input_form(example: Inputs) -> dict[str, Any]:
    """What an executed form records of its inputs: nothing for one tensor (a task's samples
    have one shape), else each tensor's shape past the batch and dtype (a sequence model's
    latency depends on the length it was padded to)."""
    if isinstance(example, torch.Tensor):
        return {}
    return {"inputs": describe(take(example, slice(0, 1)))}


def module_form(module: nn.Module) -> list[Any]:
    """Every submodule's type, configuration and tensor shapes/dtypes/layouts (not values),
    plus the code of FX graphs: what decides which kernels run on which shapes."""
    layers: list[Any] = []
    for name, sub in module.named_modules():
        tensors = [[n, type(t).__name__, list(t.shape), str(t.dtype), str(t.layout)]
                   for n, t in itertools.chain(sub.named_parameters(recurse=False),
                                               sub.named_buffers(recurse=False))]
        entry = [name, f"{type(sub).__module__}.{type(sub).__qualname__}",
                 _VALUES.sub("", sub.extra_repr()), tensors]
        if isinstance(sub, torch.fx.GraphModule):
            entry.append(sub.code)
        layers.append(entry)
    return layers


def layer_inputs(model: nn.Module, names: list[str], batch: Inputs) -> dict[str, torch.Tensor]:
    """The input tensor each of the layers ``names`` of ``model`` receives when ``model`` runs
    on ``batch`` (first call; a layer not called with a tensor is missing), to time the layer
    alone on exactly what it sees in the model."""
    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, _output: Any) -> None:  # None: output unchanged
            if args and isinstance(args[0], torch.Tensor):
                inputs.setdefault(name, args[0].detach())
        return hook

    hooks = [modules[name].register_forward_hook(keep(name)) for name in names]
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for handle in hooks:
            handle.remove()
    return inputs
