"""Runtimes: how a compressed model executes where it is deployed.

``RUNTIMES`` is the one registry of them: each ``target.runtime`` name and the object that
plans a model's kernels and materializes its model file into the executable form
(``Executable``). A new runtime is a module here and one entry in ``RUNTIMES``; the
experiment, the CLI and the report take the names and labels from it, and
``tests/test_runtimes.py`` checks every entry.
"""

from slimsearch.errors import registered
from slimsearch.runtimes._base import DTYPES, Executable, Runtime, module_form
from slimsearch.runtimes.int8 import ExecutionPlan, build_executable, engine, plan_execution
from slimsearch.runtimes.loading import load_model
from slimsearch.runtimes.onnx import OnnxRuntime
from slimsearch.runtimes.torch_runtimes import TorchRuntime, TorchScriptRuntime

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (TorchRuntime(), TorchScriptRuntime(),
                                                    OnnxRuntime())}


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``; ``ConfigError`` naming ``target.runtime`` when there is
    none."""
    return registered(RUNTIMES, "target.runtime", name)


__all__ = ["DTYPES", "RUNTIMES", "ExecutionPlan", "Executable", "Runtime", "build_executable",
           "engine", "get_runtime", "load_model", "module_form", "plan_execution"]
