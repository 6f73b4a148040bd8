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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimsearch.atomic import write_with
from slimsearch.compression import load_float_model, read_header
from slimsearch.errors import ConfigError, TrialError
from slimsearch.experiment import TargetConfig
from slimsearch.runtimes._base import Executable, module_form
from slimsearch.spaces import Recipe

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
             device: torch.device, batch: torch.Tensor,
             calibration: torch.Tensor) -> dict[str, Any] | None:
        """None: ONNX Runtime runs the float graph (its own quantization is not used)."""
        return None

    def materialize(self, model_file: Path, *, target: TargetConfig, device: torch.device,
                    example: torch.Tensor, out_dir: Path) -> Executable:
        import onnxruntime

        header = read_header(model_file)
        model = load_float_model(model_file).float().eval()
        # Two samples: torch.export specialises a batch dimension of size 1 into a constant.
        x = example[:1].repeat(2, *([1] * (example.dim() - 1))).float()
        try:
            with _quiet_export():
                program = torch.onnx.export(model, (x,), dynamo=True, optimize=True,
                                            dynamic_shapes=({0: torch.export.Dim("batch")},))
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
        input_name = session.get_inputs()[0].name
        form = {"runtime": self.name, "onnxruntime": onnxruntime.__version__,
                "device": "cpu", "dtype": "fp32", "threads": target.threads,
                "factory": header["factory"], "kwargs": header["kwargs"],
                "layers": module_form(model)}
        return Executable(runtime=self.name, artifact=path, device=torch.device("cpu"),
                          run=lambda array: session.run(None, {input_name: array})[0],
                          native=lambda t: t.detach().float().cpu().contiguous().numpy(),
                          to_tensor=torch.from_numpy, form=form,
                          notes=["ONNX Runtime executes float32 weights (no int8, no bit packing)"])
