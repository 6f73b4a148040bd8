"""The ``onnxruntime`` runtime: the model exported to one ONNX file, run by ONNX Runtime's CPU
execution provider with the target's thread count.

The ONNX file is the artifact (sized, timed, exported). It holds float32 weights: the int8
kernels and bit-packed storage of the torch runtime do not carry over, so on this runtime only
pruning and smaller students make the file smaller. That is the honest figure for a user who
deploys with ONNX Runtime, whose float32 can be much faster than eager PyTorch at batch 1
(the digits-cnn teacher: 0.044 vs 0.277 ms, two runs on the reference machine, RESULTS.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimsearch.atomic import write_with
from slimsearch.compression import load_float_model, read_header
from slimsearch.errors import ConfigError, TrialError
from slimsearch.experiment import TargetConfig
from slimsearch.runtimes._base import Executable, input_form, module_form
from slimsearch.spaces import Recipe
from slimsearch.tasks.data import Inputs, concat, inputs_to, take, takes_keywords, tensors_of

ONNX_FILE = "model.onnx"
INSTALL = 'pip install "slimsearch[onnx]"  (onnxruntime, onnx and onnxscript)'


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The exporter prints progress to stdout and logs optional-op warnings (torchvision)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _arguments(model: nn.Module, x: Inputs) -> tuple[tuple, dict]:
    """(positional, keyword) arguments of ``model`` on the inputs ``x`` (``call_model``'s
    rule)."""
    if isinstance(x, torch.Tensor):
        return (x,), {}
    if isinstance(x, dict):
        return ((), dict(x)) if takes_keywords(model, x) else ((x,), {})
    return tuple(x), {}


def _feed(inputs: Inputs, names: list[str]) -> dict[str, Any]:
    """ONNX Runtime's input dict for a batch: by name where the graph's inputs carry the
    dict's keys, else in order."""
    inputs = inputs_to(inputs, "cpu", torch.float32)
    arrays = {k: v.detach().contiguous().numpy() for k, v in (
        inputs.items() if isinstance(inputs, dict)
        else enumerate(tensors_of(inputs)))}
    if isinstance(inputs, dict) and set(names) <= set(arrays):
        return {name: arrays[name] for name in names}
    if len(names) != len(arrays):  # the exporter drops inputs the graph does not use
        raise TrialError(f"the ONNX graph takes the inputs {names}, the batch holds "
                         f"{list(arrays)}: give the model only the inputs its forward uses")
    return dict(zip(names, arrays.values(), strict=True))


class OnnxRuntime:
    """ONNX export (torch.export based, dynamic batch) + ONNX Runtime on the CPU."""

    name = "onnxruntime"
    label = "ONNX Runtime (CPU, float32 weights)"

    def check(self, target: TargetConfig, device: torch.device) -> None:
        if target.dtype != "fp32":
            raise ConfigError(f"target.dtype = {target.dtype!r}: runtime = 'onnxruntime' runs "
                              "float32 (its CPU provider); set target.dtype = 'fp32', or use "
                              "runtime = 'torch'")
        missing = [m for m in ("onnxruntime", "onnx", "onnxscript")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"target.runtime = 'onnxruntime' needs {', '.join(missing)}, which "
                              f"is not installed; install it with: {INSTALL}")
        if device.type != "cpu":
            raise ConfigError(f"target.runtime = 'onnxruntime' runs on the CPU, but the target "
                              f"device is {str(device)!r}; set target.device = 'cpu', or use "
                              "runtime = 'torch' or 'torchscript' on CUDA")

    def plan(self, model: nn.Module, recipe: Recipe, *, target: TargetConfig,
             device: torch.device, batch: Inputs,
             calibration: Inputs | Callable[[], Inputs]) -> dict[str, Any] | None:
        """None: ONNX Runtime runs the float graph (its own quantization is not used)."""
        return None

    def materialize(self, model_file: Path, *, target: TargetConfig, device: torch.device,
                    example: Inputs, out_dir: Path) -> Executable:
        import onnxruntime

        header = read_header(model_file)
        model = load_float_model(model_file).float().eval()
        # Two samples: torch.export specialises a batch dimension of size 1 into a constant.
        one = take(example, slice(0, 1))
        x = inputs_to(concat([one, one]), "cpu", torch.float32)
        args, kwargs = _arguments(model, x)
        batch = torch.export.Dim("batch")
        dims = lambda a: {k: {0: batch} for k in a} if isinstance(a, dict) else {0: batch}  # noqa: E731
        dynamic = dims(kwargs) if kwargs else tuple(dims(a) for a in args)
        try:
            with _quiet_export():
                program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True,
                                            optimize=True, dynamic_shapes=dynamic)
        except Exception as exc:  # the exporter raises many types for unsupported code and ops
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise TrialError(f"runtime 'onnxruntime' cannot export this model to ONNX: "
                             f"{type(exc).__name__}: {first}") from exc
        path = write_with(out_dir / ONNX_FILE,
                          lambda tmp: program.save(str(tmp), external_data=False))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = target.threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        session = onnxruntime.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if isinstance(example, torch.Tensor) and len(names) == 1:  # as timed before dict inputs
            name = names[0]
            run = lambda array: session.run(None, {name: array})[0]  # noqa: E731
            native = lambda t: t.detach().float().cpu().contiguous().numpy()  # noqa: E731
        else:
            run = lambda feed: session.run(None, feed)[0]  # noqa: E731
            native = lambda inputs: _feed(inputs, names)  # noqa: E731
        form = {"runtime": self.name, "onnxruntime": onnxruntime.__version__,
                "device": "cpu", "dtype": "fp32", "threads": target.threads,
                "factory": header["factory"], "kwargs": header["kwargs"],
                "layers": module_form(model), **input_form(example)}
        return Executable(runtime=self.name, artifact=path, device=torch.device("cpu"),
                          run=run, native=native,
                          to_tensor=torch.from_numpy, form=form,
                          notes=["ONNX Runtime executes float32 weights (no int8, no bit packing)"])
