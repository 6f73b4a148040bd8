"""The PyTorch runtimes: ``torch`` (eager) and ``torchscript`` (traced, frozen, saved, loaded).

``torch`` executes the model rebuilt from the slimsearch model file, so that file is its
artifact: bit-packed weights, int8 layers where they were measured faster. ``torchscript``
traces that same executable model into a frozen TorchScript file, which is then what is
sized, timed and exported (a deployment loads it without slimsearch or the model's code).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimsearch.atomic import write_with
from slimsearch.compression import read_header
from slimsearch.errors import ConfigError, TrialError
from slimsearch.experiment import TargetConfig
from slimsearch.runtimes._base import DTYPES, Executable, input_form, module_form
from slimsearch.runtimes.cuda import build_cuda_executable, plan_cuda_execution
from slimsearch.runtimes.int8 import OPS_ENGINE, ExecutionPlan, plan_execution
from slimsearch.runtimes.loading import load_model
from slimsearch.spaces import Recipe
from slimsearch.tasks.data import Inputs, inputs_to, output_tensor, takes_keywords

TORCHSCRIPT_FILE = "model.torchscript.pt"


def _executable_module(model_file: Path, target: TargetConfig,
                       device: torch.device) -> tuple[nn.Module, dict]:
    header = read_header(model_file)
    model = load_model(model_file).to(device=device, dtype=DTYPES[target.dtype]).eval()
    plan = header.get("execution")
    if plan and plan["mode"] == "cuda" and device.type == "cuda":
        model = build_cuda_executable(model, ExecutionPlan.from_dict(plan))
    return model, header


def _form(runtime: str, module: nn.Module, header: dict, target: TargetConfig,
          device: torch.device, example: Inputs) -> dict:
    return {"runtime": runtime, "torch": torch.__version__, "device": str(device),
            "dtype": target.dtype, "threads": target.threads, "cuda_graphs": target.cuda_graphs,
            "factory": header["factory"], "kwargs": header["kwargs"],
            "layers": module_form(module), **input_form(example)}


class TorchRuntime:
    """PyTorch eager execution of the model rebuilt from the slimsearch model file."""

    name = "torch"
    label = "PyTorch eager"

    def check(self, target: TargetConfig, device: torch.device) -> None:
        if target.dtype == "fp16" and device.type == "cpu":
            raise ConfigError(f"target.dtype = 'fp16' on the CPU: PyTorch's CPU kernels for "
                              f"float16 are slow emulations, so runtime = {self.name!r} would "
                              "time a form nobody deploys; use 'fp32' or 'bf16' on CPU, or a "
                              "CUDA device")

    def plan(self, model: nn.Module, recipe: Recipe, *, target: TargetConfig,
             device: torch.device, batch: Inputs,
             calibration: Inputs | Callable[[], Inputs]) -> dict[str, Any] | None:
        """On CUDA, torchao's weight-only and 2:4 semi-structured kernels; on the CPU in
        float32, PyTorch's int8 kernels; each layer where it was measured faster."""
        if device.type == "cuda":
            plan = plan_cuda_execution(model, recipe.layers, batch=batch,
                                       dtype=DTYPES[target.dtype], device=device)
            return plan.to_dict() if plan else None
        return _int8_plan(model, recipe, target=target, batch=batch, calibration=calibration)

    def materialize(self, model_file: Path, *, target: TargetConfig, device: torch.device,
                    example: Inputs, out_dir: Path) -> Executable:
        module, header = _executable_module(model_file, target, device)
        dtype = DTYPES[target.dtype]
        return Executable(runtime=self.name, artifact=model_file, device=device,
                          run=_runner(module, example),
                          native=lambda x: inputs_to(x, device, dtype),
                          to_tensor=output_tensor, module=module,
                          form=_form(self.name, module, header, target, device,
                                     example))


def _runner(module: Callable[..., Any], example: Inputs) -> Callable[[Any], Any]:
    """How ``module`` is called on a batch like ``example``: itself for one tensor (nothing
    between the timer and the model), else by ``tasks.data.call_model``'s rule, decided
    here once rather than in every timed call."""
    if isinstance(example, torch.Tensor):
        return module
    if isinstance(example, dict):  # decided once, not in every timed call
        if takes_keywords(module, example):
            return lambda inputs: module(**inputs)
        return module
    return lambda inputs: module(*inputs)


def _int8_plan(model: nn.Module, recipe: Recipe, *, target: TargetConfig, batch: Inputs,
               calibration: Inputs | Callable[[], Inputs],
               ops_engine: str | None = OPS_ENGINE) -> dict[str, Any] | None:
    """PyTorch's int8 CPU kernels where they were measured faster (float32 targets only)."""
    if target.dtype != "fp32":
        return None
    plan = plan_execution(model, {n: r.bits for n, r in recipe.layers.items()}, batch=batch,
                          calibration=calibration, activation_bits=recipe.activation_bits,
                          threads=target.threads, symmetric=recipe.weight_scheme == "symmetric",
                          ops_engine=ops_engine)
    return plan.to_dict() if plan else None


@contextlib.contextmanager
def _jit_quiet() -> Iterator[None]:
    # torch.jit warns that it is deprecated in favour of torch.export; it is still what
    # deploys without Python, and the user chose it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class TorchScriptRuntime(TorchRuntime):
    """``torch.jit.trace`` + ``torch.jit.freeze`` of the executable model, saved and reloaded
    (the same checks as the torch runtime)."""

    name = "torchscript"
    label = "TorchScript (traced, frozen)"

    def plan(self, model: nn.Module, recipe: Recipe, *, target: TargetConfig,
             device: torch.device, batch: Inputs,
             calibration: Inputs | Callable[[], Inputs]) -> dict[str, Any] | None:
        """PyTorch's int8 CPU kernels (they trace); on CUDA the float layers, because
        torchao's tensor subclasses do not trace. The trace records the ops, not the engine
        set while they ran, so pooling and adds stay on the weights' engine."""
        if device.type == "cuda":
            return None
        return _int8_plan(model, recipe, target=target, batch=batch, calibration=calibration,
                          ops_engine=None)

    def materialize(self, model_file: Path, *, target: TargetConfig, device: torch.device,
                    example: Inputs, out_dir: Path) -> Executable:
        module, header = _executable_module(model_file, target, device)
        dtype = DTYPES[target.dtype]
        x = inputs_to(example, device, dtype)
        keywords = isinstance(x, dict) and takes_keywords(module, x)
        try:
            with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                warnings.simplefilter("always")
                if keywords:
                    traced = torch.jit.trace(module, example_kwarg_inputs=x, check_trace=False,
                                             strict=False)
                else:
                    traced = torch.jit.trace(module, x if isinstance(x, tuple) else (x,),
                                             check_trace=False, strict=False)
                frozen = torch.jit.freeze(traced.eval())
        except Exception as exc:  # tracing raises many types on dynamic Python code
            raise TrialError(f"runtime 'torchscript' cannot trace this model: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                             ) from exc
        # A trace records the branch the example took: data-dependent control flow would run
        # the wrong code on other inputs without an error, so it fails the trial instead.
        tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
        if tracer:
            raise TrialError("runtime 'torchscript' cannot trace this model faithfully: "
                             f"{str(tracer[0].message).splitlines()[0]} Use runtime = 'torch', or "
                             "remove the data-dependent Python control flow from forward")
        path = out_dir / TORCHSCRIPT_FILE
        with _jit_quiet():
            write_with(path, lambda tmp: torch.jit.save(frozen, str(tmp)))
            loaded = torch.jit.load(str(path), map_location=device).eval()
        run = ((lambda inputs: loaded(**inputs)) if keywords
               else (lambda inputs: loaded(inputs)) if isinstance(x, dict)
               else _runner(loaded, example))
        return Executable(runtime=self.name, artifact=path, device=device, run=run,
                          native=lambda t: inputs_to(t, device, dtype),
                          to_tensor=output_tensor, module=loaded,
                          form=_form(self.name, module, header, target, device,
                                     example))
