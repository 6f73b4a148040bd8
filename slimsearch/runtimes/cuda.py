"""Real low-precision and 2:4-sparse execution on CUDA, chosen layer by layer.

The GPU counterpart of ``runtimes.int8``. Each Linear layer whose recipe allows it may run:

- ``int8-weight-only``: torchao's int8 weights (per output row), float activations;
- ``int4-weight-only``: torchao's int4 tinygemm kernel (groups of 128 inputs; bfloat16 only,
  compute capability >= 8.0);
- ``2:4-sparse``: PyTorch's semi-structured sparse matmul (cuSPARSELt; float16/bfloat16), for
  layers pruned to the 2:4 pattern;
- ``float``: the dense layer as it is.

Only Linear layers are candidates: torchao's weight-only kernels have no convolution. In eager
mode torchao's weight-only layers often lose to the dense matmul (they dequantize on every
call), so, as on the CPU, a kernel runs only where it was measured faster than the float layer
on that layer's real input, and the whole model only when it is faster than all-float. The
choice is recorded in the plan (``mode="cuda"``) so ``build_cuda_executable`` rebuilds exactly
what was measured, without timing anything again.

torchao is optional: without it only 2:4 is possible, and the plan says why.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimsearch.errors import ArtifactError
from slimsearch.runtimes._base import layer_inputs
from slimsearch.runtimes.int8 import MARGIN, ExecutionPlan
from slimsearch.tasks.data import Inputs, call_model, inputs_to
from slimsearch.timing.latency import measure_latency

FLOAT = "float"
INT8 = "int8-weight-only"
INT4 = "int4-weight-only"
SPARSE_2_4 = "2:4-sparse"
KERNELS = (FLOAT, INT8, INT4, SPARSE_2_4)
TORCHAO_KERNELS = (INT8, INT4)
#: Inputs per int4 scale group. torchao silently leaves a layer whose in_features is not a
#: multiple of it unquantized, so the plan checks it itself rather than record a kernel that
#: is not running.
INT4_GROUP_SIZE = 128
#: cuSPARSELt (float16/bfloat16): both weight dimensions must be multiples of this (>= it).
SPARSE_MULTIPLE = 16
TORCHAO_MISSING = "torchao not installed (pip install torchao)"


class CudaCandidate(NamedTuple):
    """What a layer's recipe allows: its weights' bit width and its pruning pattern ("2:4"
    makes it a 2:4-sparse candidate; anything else, or None, does not)."""

    bits: int
    pattern: str | None = None


def _as_candidate(value: Any) -> CudaCandidate:
    """A ``CudaCandidate`` from a ``(bits, pattern)`` tuple, or from a recipe's layer
    (``LayerRecipe``: ``bits``, ``pruning``, ``sparsity``; 2:4 only when it really prunes)."""
    if isinstance(value, tuple):
        return CudaCandidate(*value)
    pattern = value.pruning if getattr(value, "sparsity", 1.0) > 0 else None
    return CudaCandidate(int(value.bits), pattern)


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """torchao logs (and warns) at import time, e.g. about C++ extensions built for another
    torch or pytree registrations; none of it concerns the kernels used here."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _torchao() -> tuple[Any | None, str | None]:
    """(``torchao.quantization``, None), or (None, why it cannot be used). Imported lazily:
    torchao is optional and slow to import."""
    try:
        with _quiet_import():
            import torchao.quantization as quantization
    except ImportError:
        return None, TORCHAO_MISSING
    except Exception as exc:  # a torchao built for another torch can fail in many ways
        return None, f"torchao failed to import: {_first_line(exc)}"
    return quantization, None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an exception, cut at ``limit`` characters (PyTorch's dispatcher
    errors list every backend on their first line)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"


def _is_2_4(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs of each output row: the
    layout cuSPARSELt compresses. (Compressing other weights would silently drop values.)"""
    rows = weight.detach().reshape(weight.shape[0], -1)
    if rows.shape[1] % 4:
        return False
    return bool(rows.reshape(rows.shape[0], -1, 4).ne(0).sum(-1).le(2).all())


def _impossible(layer: nn.Module, kernel: str, *, torchao_reason: str | None) -> str | None:
    """Why ``layer`` (as it is: device, dtype, weights) cannot run ``kernel``, or None."""
    if kernel not in KERNELS:
        return f"unknown kernel {kernel!r} (expected one of {KERNELS})"
    if kernel == FLOAT:
        return None
    if not isinstance(layer, nn.Linear):
        return f"{type(layer).__name__} has no {kernel} kernel: only nn.Linear layers do"
    if parametrize.is_parametrized(layer, "weight"):
        return "the weight is parametrized (fake-quantized or masked): fold it into the weight first"
    weight = layer.weight
    if weight.device.type != "cuda":
        return f"the layer is on {weight.device}: {kernel} runs on CUDA only"
    if kernel in TORCHAO_KERNELS and torchao_reason is not None:
        return torchao_reason
    if kernel == INT4:
        if weight.dtype != torch.bfloat16:
            return f"int4 (tinygemm) takes bfloat16 weights, not {_name(weight.dtype)}"
        capability = torch.cuda.get_device_capability(weight.device)
        if capability < (8, 0):
            return f"int4 (tinygemm) needs compute capability >= 8.0, this GPU has {capability}"
        if layer.in_features % INT4_GROUP_SIZE:
            return (f"in_features = {layer.in_features} is not a multiple of the int4 group size "
                    f"{INT4_GROUP_SIZE} (torchao would leave the layer float)")
    if kernel == SPARSE_2_4:
        if weight.dtype not in (torch.float16, torch.bfloat16):
            # PyTorch's only other 2:4 kernel (CUTLASS, the one with float32) is built for sm8x
            # GPUs alone; it is not used, so float32 layers stay dense everywhere.
            return (f"2:4 runs on cuSPARSELt, which takes float16/bfloat16 weights, not "
                    f"{_name(weight.dtype)}")
        cusparselt = getattr(torch.backends, "cusparselt", None)
        if cusparselt is None or not cusparselt.is_available():
            return "this torch build has no cuSPARSELt (the 2:4 sparse matmul)"
        rows, cols = weight.shape
        if rows % SPARSE_MULTIPLE or cols % SPARSE_MULTIPLE:
            return (f"cuSPARSELt needs both weight dimensions to be multiples of {SPARSE_MULTIPLE}; "
                    f"this weight is {rows}x{cols}")
        if layer.bias is not None and layer.bias.dtype != weight.dtype:
            return (f"the bias is {_name(layer.bias.dtype)} and the weight {_name(weight.dtype)}: "
                    "the sparse matmul adds the bias in the weight's dtype")
        if not _is_2_4(weight):
            return "the weight is not 2:4 sparse (some group of 4 inputs has more than 2 nonzeros)"
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _apply_kernels(model: nn.Module, kernels: Mapping[str, str], quantization: Any) -> None:
    """Put the named layers of ``model`` on their kernels, in place (checked beforehand)."""
    configs = {
        # set_inductor_config=False: torchao would otherwise change global torch.compile
        # settings of the whole process; nothing here is compiled.
        INT8: lambda: quantization.Int8WeightOnlyConfig(granularity=quantization.PerRow(),
                                                        set_inductor_config=False),
        # tile_packed_to_4d: the tinygemm layout, built into torch's CUDA kernels; torchao's
        # default (plain) int4 format needs the separate mslk package.
        INT4: lambda: quantization.Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE,
                                                        int4_packing_format="tile_packed_to_4d",
                                                        set_inductor_config=False),
    }
    for kernel, config in configs.items():
        wanted = {name for name, how in kernels.items() if how == kernel}
        if wanted:
            # filter_fn(module, fqn) is asked from the root down; a match is replaced whole.
            quantization.quantize_(model, config(), filter_fn=lambda _m, fqn, w=wanted: fqn in w)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, how in kernels.items():
            if how == SPARSE_2_4:
                linear = modules[name]
                # No alg_id: torch 2.11's to_sparse_semi_structured has none.
                sparse = torch.sparse.to_sparse_semi_structured(linear.weight.detach().contiguous())
                linear.weight = nn.Parameter(sparse, requires_grad=False)


def build_cuda_executable(model: nn.Module, plan: ExecutionPlan) -> nn.Module:
    """The model as it runs: a copy of ``model`` (float, already on the CUDA device and in the
    plan's dtype) with each layer on the kernel the plan records. No timing: deterministic.
    ``model`` itself is returned when every layer runs float.

    Raises ArtifactError when a recorded kernel is impossible here (torchao missing, another
    dtype or GPU, a weight that is no longer 2:4): the file promises that kernel, and running
    something else would not be what was measured.
    """
    if plan.mode != "cuda":
        raise ArtifactError(f"execution plan of mode {plan.mode!r} given to the CUDA runtime")
    kernels = {name: how for name, how in plan.layers.items() if how != FLOAT}
    if not kernels:
        return model
    quantization, torchao_reason = None, None
    torchao_layers = sorted(n for n, how in kernels.items() if how in TORCHAO_KERNELS)
    if torchao_layers:
        quantization, torchao_reason = _torchao()
        if quantization is None:
            raise ArtifactError(f"the model file runs layers {torchao_layers} on torchao's "
                                f"weight-only kernels, but {torchao_reason}")
    modules = dict(model.named_modules())
    for name, how in kernels.items():
        if name not in modules:
            raise ArtifactError(f"the execution plan names layer {name!r}, which the model lacks; "
                                "was the model code changed since the file was written?")
        reason = _impossible(modules[name], how, torchao_reason=torchao_reason)
        if reason is not None:
            raise ArtifactError(f"the model file runs layer {name!r} on {how}, impossible here: {reason}")
    executable = copy.deepcopy(model).eval()
    _apply_kernels(executable, kernels, quantization)
    return executable


def _calls(module: nn.Module, batch: Inputs) -> Any:
    """``module`` as a plain callable, so ``measure_latency`` does not ``.to()`` it (moving
    parameters that are tensor subclasses swaps them; not needed here and not checked for
    every subclass)."""
    if isinstance(batch, torch.Tensor):
        return lambda x: module(x)
    return functools.partial(call_model, module)


def _ms(fn: Any, x: torch.Tensor, device: torch.device) -> float:
    """Median milliseconds per call: the project's protocol with few samples (a decision, not
    a reported objective)."""
    return measure_latency(fn, x, device=device, warmup=10, samples=30).median_ms


#: (layer type, weight shape, bias, input shape, dtype, kernel, device name) -> ms, or why the
#: kernel failed. Timings do not depend on weight values, so equal shapes share them.
_LAYER_CACHE: dict[tuple, float | str] = {}


def _layer_ms(layer: nn.Linear, x: torch.Tensor, kernel: str, quantization: Any,
              device: torch.device) -> float | str:
    """Milliseconds of ``layer`` alone on ``x`` on ``kernel``, or the exception it raised."""
    key = (type(layer).__name__, tuple(layer.weight.shape), layer.bias is not None, tuple(x.shape),
           str(layer.weight.dtype), kernel, torch.cuda.get_device_name(device))
    if key not in _LAYER_CACHE:
        try:
            if kernel == FLOAT:
                _LAYER_CACHE[key] = _ms(_calls(layer, x), x, device)
            else:
                single = nn.Sequential(copy.deepcopy(layer)).eval()
                _apply_kernels(single, {"0": kernel}, quantization)
                _LAYER_CACHE[key] = _ms(_calls(single, x), x, device)
        except Exception as exc:  # any failing kernel (shape, driver, library) leaves it float
            _LAYER_CACHE[key] = f"failed: {_first_line(exc)}"
    return _LAYER_CACHE[key]


def _on(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``model`` when its floating tensors are already on ``device`` in ``dtype``, else a copy
    that is."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    if all(t.device == device and t.dtype == dtype for t in tensors):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def _wanted(candidate: CudaCandidate) -> list[str]:
    kernels = []
    if candidate.bits <= 8:
        kernels.append(INT8)
    if candidate.pattern == "2:4":
        kernels.append(SPARSE_2_4)
    if candidate.bits <= 4:
        kernels.append(INT4)
    return kernels


def plan_cuda_execution(model: nn.Module, layers: Mapping[str, Any], *, batch: Inputs,
                        dtype: torch.dtype, device: torch.device) -> ExecutionPlan | None:
    """Decide, by measurement at the target batch ``batch``, which kernel each layer runs.

    ``layers`` maps a layer name to a ``CudaCandidate`` (or a ``(bits, pattern)`` tuple, or a
    ``LayerRecipe``). A Linear layer is a candidate when its bits are <= 8 (int8 weight-only;
    also int4 weight-only at <= 4 bits) or its pattern is "2:4". ``model`` runs in ``dtype`` on
    ``device`` (a converted copy is made when it is not there yet); a floating ``batch`` is
    converted to ``dtype`` too. Returns None when ``device`` is not CUDA or there is no
    candidate. ``plan.decisions`` holds, per candidate layer, ``float_ms``, ``<kernel>_ms`` for
    each kernel measured, ``<kernel>_skipped`` for each kernel that was impossible or failed,
    and ``layer choice`` (the verdict alone); ``"model"`` holds the whole-model check, whose
    fallback to float overrides every layer's choice in ``plan.layers`` (the final word).
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    wanted = {name: _wanted(_as_candidate(value)) for name, value in layers.items()}
    modules = dict(model.named_modules())
    candidates = [n for n, kernels in wanted.items()
                  if kernels and isinstance(modules.get(n), nn.Linear)]
    if not candidates:
        return None
    model = _on(model, device, dtype).eval()
    modules = dict(model.named_modules())
    batch = inputs_to(batch, device, dtype)
    quantization, torchao_reason = None, None
    if any(k in TORCHAO_KERNELS for n in candidates for k in wanted[n]):
        quantization, torchao_reason = _torchao()

    inputs = layer_inputs(model, candidates, batch)
    plan = ExecutionPlan(mode="cuda", layers={}, engine="torch",
                         input_shape=list(batch.shape[1:]) if isinstance(batch, torch.Tensor) else [])
    plan.decisions["cuda"] = {"device": torch.cuda.get_device_name(device),
                              "capability": list(torch.cuda.get_device_capability(device)),
                              "dtype": _name(dtype), "torch": torch.__version__,
                              "torchao": _torchao_version(quantization) or torchao_reason}
    for name in candidates:
        record: dict[str, Any] = {}
        plan.decisions[name] = record
        plan.layers[name] = _layer_choice(modules[name], inputs.get(name), wanted[name], record,
                                          quantization=quantization,
                                          torchao_reason=torchao_reason, device=device)
    if any(how != FLOAT for how in plan.layers.values()):
        _check_whole_model(model, batch, plan, device)
    else:
        plan.decisions["model"] = {"chosen": "float", "why": "no layer ran faster on another kernel"}
    if any(how in TORCHAO_KERNELS for how in plan.layers.values()):
        plan.engine = "torchao"
    return plan


def _layer_choice(layer: nn.Linear, x: torch.Tensor | None, kernels: list[str],
                  record: dict[str, Any], *, quantization: Any, torchao_reason: str | None,
                  device: torch.device) -> str:
    """The kernel ``layer`` runs on: the fastest of ``kernels`` when it beats float by the
    margin on its own input ``x``, else float; every timing and skip is written to ``record``."""
    if x is None:
        record["layer choice"] = FLOAT
        record["skipped"] = "the layer was not called (with a tensor) on the batch"
        return FLOAT
    float_ms = _layer_ms(layer, x, FLOAT, None, device)
    if isinstance(float_ms, str):
        record["skipped"], record["layer choice"] = f"float timing {float_ms}", FLOAT
        return FLOAT
    record["float_ms"] = round(float_ms, 4)
    timed = {}
    for kernel in kernels:
        reason = _impossible(layer, kernel, torchao_reason=torchao_reason)
        result = reason or _layer_ms(layer, x, kernel, quantization, device)
        if isinstance(result, str):
            record[f"{kernel}_skipped"] = result
        else:
            timed[kernel] = result
            record[f"{kernel}_ms"] = round(result, 4)
    best = min(timed, key=timed.get, default=FLOAT)
    choice = best if best != FLOAT and timed[best] < (1 - MARGIN) * float_ms else FLOAT
    record["layer choice"] = choice
    return choice


def _check_whole_model(model: nn.Module, batch: Inputs, plan: ExecutionPlan,
                       device: torch.device) -> None:
    """Time float vs the per-layer choice as whole models, and fall back to all-float (in
    ``plan``) unless the choice wins by MARGIN: never slower by accident, as a whole either."""
    record: dict[str, Any] = {}
    try:
        float_ms = _ms(_calls(model, batch), batch, device)
        record["float ms"] = round(float_ms, 4)
        executable = build_cuda_executable(model, plan)
        chosen_ms = _ms(_calls(executable, batch), batch, device)
        record["per layer ms"] = round(chosen_ms, 4)
        del executable
        keep = chosen_ms < (1 - MARGIN) * float_ms
    except Exception as exc:  # building or running the mixed model failed: float is safe
        record["failed"] = _first_line(exc)
        keep = False
    record["chosen"] = "per layer" if keep else "float"
    plan.decisions["model"] = record
    if not keep:
        plan.layers = dict.fromkeys(plan.layers, FLOAT)


def _torchao_version(quantization: Any) -> str | None:
    if quantization is None:
        return None
    import torchao  # already imported with torchao.quantization

    return str(getattr(torchao, "__version__", "unknown"))
