"""Runtimes: how a compressed model executes where it is deployed.

``RUNTIMES`` maps each ``target.runtime`` name to the object that materializes a model file
into its executable form (``Executable``); ``runtimes.int8`` decides, by measurement, which
layers run PyTorch's int8 kernels on the CPU.
"""

from slimsearch.runtimes._base import DTYPES, Executable, Runtime, module_form
from slimsearch.runtimes.int8 import ExecutionPlan, build_executable, engine, plan_execution
from slimsearch.runtimes.loading import load_model
from slimsearch.runtimes.onnx import OnnxRuntime
from slimsearch.runtimes.torch_runtimes import TorchRuntime, TorchScriptRuntime

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (TorchRuntime(), TorchScriptRuntime(),
                                                    OnnxRuntime())}


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name`` (the experiment validated it is one of ``RUNTIMES``)."""
    return RUNTIMES[name]


__all__ = ["DTYPES", "RUNTIMES", "ExecutionPlan", "Executable", "Runtime", "build_executable",
           "engine", "get_runtime", "load_model", "module_form", "plan_execution"]
