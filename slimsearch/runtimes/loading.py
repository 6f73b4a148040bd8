"""``load_model``: the model a model file describes, on the kernels it was measured on."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from slimsearch.compression import load_float_model, read_header, resolve_model_file
from slimsearch.runtimes.int8 import ExecutionPlan, build_executable


def load_model(path: str | Path, *, int8: bool = True) -> nn.Module:
    """Rebuild the executable model (eval mode, CPU) from a slimsearch model file, trial
    folder or export bundle (whose files must match its manifest).

    Nothing pickled is read: the factory named in the file is imported (and must carry
    ``@slimsearch.model_factory``), layers are resized to the stored shapes, weights are
    decoded from the file, and the layers the file's execution plan runs int8 are put on
    PyTorch's int8 kernels, exactly as when measured. A plan for CUDA kernels is applied by
    the torch runtime once the model is on its GPU and in its dtype; here the model is float.
    ``int8=False`` keeps every layer float (the dequantized weights the file stores).
    """
    path = resolve_model_file(path)
    model = load_float_model(path)
    plan = read_header(path).get("execution")
    if int8 and plan and plan["mode"] != "cuda":
        model = build_executable(model, ExecutionPlan.from_dict(plan))
    return model
