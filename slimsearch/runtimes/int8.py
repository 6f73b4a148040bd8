"""Real int8 execution on CPU with PyTorch's quantized kernels, chosen layer by layer.

The model file stores every weight at its recipe's bit width. What *runs* is decided when the
trial materializes its model, and recorded in the file, so ``load_model`` rebuilds exactly
what was measured:

- ``static``: activations are int8 too, with ranges calibrated on training data and stored in
  the file; Conv2d and Linear run PyTorch's static int8 kernels (FX graph mode, so residual
  adds, BatchNorm folding and flatten are handled by PyTorch, not by us);
- ``dynamic``: float activations, int8 weights; Linear layers run the dynamic int8 kernel.

Layers run int8 only where that was measured faster at the target batch size (int8 kernels
lose to float at batch 1 on small CPUs and win at batch 256): static int8 is first timed with
every candidate on it, against all-float; when that loses (and for dynamic int8) each layer is
timed alone against its float form, and the mix of the winners runs only when the whole model
then beats all-float. Layers with weights of fewer than 8 bits run on
the int8 kernel too: their values sit on a coarser grid, requantized to int8 at load.

A static form is also timed with QNNPACK's kernels for the ops that hold no weights (max
pooling, adds): PyTorch picks those by the quantized engine set when they run, while Conv2d
and Linear keep the kernels their weights were packed for (``OPS_ENGINE``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from slimsearch.errors import ArtifactError
from slimsearch.runtimes._base import layer_inputs, module_form
from slimsearch.tasks.data import Inputs, batch_len, call_model, describe, take
from slimsearch.timing.latency import compare_latency


def engine() -> str | None:
    """The quantized engine this torch build has for x86/ARM CPUs, or None."""
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in torch.backends.quantized.supported_engines:
            return name
    return None


@dataclass
class ExecutionPlan:
    """Which layers run int8, how, and the calibrated activation ranges (static mode)."""

    mode: str
    layers: dict[str, str]
    input_shape: list[int]
    engine: str
    ranges: dict[str, list[float]] = field(default_factory=dict)
    #: Per layer and for the whole model: measured float and int8 milliseconds, and why.
    decisions: dict[str, Any] = field(default_factory=dict)
    #: The quantized engine set while the model runs, where it was measured faster than
    #: ``engine`` (``OPS_ENGINE``); None: ``engine``.
    ops_engine: str | None = None

    @property
    def int8_layers(self) -> list[str]:
        return [n for n, how in self.layers.items() if how == "int8"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecutionPlan:
        return cls(**data)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated in favour of torchao's pt2e flow;
    it remains the CPU int8 path that works on every torch >= 2.4, so the warning is noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _weight_observer() -> Any:
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    # Symmetric weights on [-127, 127]: the grid the model file's symmetric codes use.
    return PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                              quant_min=-127, quant_max=127)


def _static_qconfig() -> Any:
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import MinMaxObserver

    # reduce_range: 7-bit activations, so x86 CPUs without VNNI cannot overflow the int16
    # accumulations of the int8 kernels (PyTorch's own x86 default does the same).
    return QConfig(activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=True),
                   weight=_weight_observer())


def _dynamic_qconfig() -> Any:
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import PlaceholderObserver

    return QConfig(activation=PlaceholderObserver.with_args(dtype=torch.quint8, is_dynamic=True),
                   weight=_weight_observer())


def _prepare_static(model: nn.Module, layers: list[str], input_shape: list[int]) -> nn.Module:
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    mapping = QConfigMapping()
    for name in layers:
        mapping.set_module_name(name, _static_qconfig())
    example = (torch.zeros(1, *input_shape),)
    return prepare_fx(copy.deepcopy(model).eval(), mapping, example_inputs=example)


def _observers(prepared: nn.Module) -> dict[str, nn.Module]:
    """The activation observers FX inserted (per-tensor: a scalar range each)."""
    return {n: m for n, m in prepared.named_modules()
            if "activation_post_process" in n and getattr(m, "min_val", None) is not None
            and m.min_val.dim() == 0}


#: The quantized engine whose kernels may run the ops that hold no weights. PyTorch dispatches
#: max pooling and adds of quantized tensors by the engine set when they run; the x86 engine's
#: max pooling is scalar over few channels: 2.2 ms against QNNPACK's 0.68 ms for 256 x 8 x 32
#: x 32 (channels last, uint8), and digits-cnn students on static int8 spent half their time
#: in it at batch 256 (their Conv2d and Linear layers keep their x86 kernels, whose packed
#: weights carry them; the outputs are identical). Measured per plan, never assumed.
OPS_ENGINE = "qnnpack"


class OnEngine(nn.Module):
    """``module`` run with the quantized engine ``engine`` set (and the previous one set
    again after each call): see OPS_ENGINE. A traced or scripted copy would not carry it."""

    def __init__(self, module: nn.Module, engine: str) -> None:
        super().__init__()
        self.module = module
        self.engine = engine

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.engine
        try:
            return self.module(*args, **kwargs)
        finally:
            torch.backends.quantized.engine = previous

    def extra_repr(self) -> str:  # in module_form, so the latency cache tells engines apart
        return f"engine={self.engine!r}"


def _on_ops_engine(module: nn.Module, plan: ExecutionPlan) -> nn.Module:
    """``module`` (the plan's int8 form) with the plan's ops engine, where it has one."""
    if plan.ops_engine is None or plan.ops_engine == plan.engine:
        return module
    if plan.ops_engine not in torch.backends.quantized.supported_engines:
        warnings.warn(f"int8 engine {plan.ops_engine!r} is not available here: its pooling and "
                      f"adds run on {plan.engine!r}; latency will differ from the measured one",
                      stacklevel=3)
        return module
    return OnEngine(module, plan.ops_engine)


def build_executable(model: nn.Module, plan: ExecutionPlan) -> nn.Module:
    """The model as it runs: ``model`` with the plan's int8 layers on int8 kernels."""
    layers = plan.int8_layers
    if not layers:
        return model
    if plan.engine not in torch.backends.quantized.supported_engines:
        fallback = engine()
        if fallback is None:
            warnings.warn(f"the model file asks for the {plan.engine!r} int8 engine, which this "
                          "torch build lacks: running every layer float", stacklevel=2)
            return model
        warnings.warn(f"int8 engine {plan.engine!r} is not available here: using {fallback!r}; "
                      "latency will differ from the measured one", stacklevel=2)
        plan = ExecutionPlan(**{**plan.to_dict(), "engine": fallback})
    torch.backends.quantized.engine = plan.engine
    with _quiet():
        if plan.mode == "dynamic":
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(copy.deepcopy(model).eval(),
                                    {name: _dynamic_qconfig() for name in layers},
                                    dtype=torch.qint8)
        prepared = _prepare_static(model, layers, plan.input_shape)
        observers = _observers(prepared)
        if set(observers) != set(plan.ranges):
            raise ArtifactError("the model's int8 graph does not match the calibration stored in "
                                f"the file ({len(observers)} observers, {len(plan.ranges)} stored); "
                                "was the model code changed since the file was written?")
        for name, observer in observers.items():
            low, high = plan.ranges[name]
            observer.min_val = torch.tensor(low)
            observer.max_val = torch.tensor(high)
    return _on_ops_engine(_converted(prepared), plan)


@dataclass
class Int8Form:
    """A model with the given layers on static int8: its executable form and the activation
    ranges it was calibrated to (what a plan stores)."""

    module: nn.Module
    ranges: dict[str, list[float]]


def _static_int8_or_why(model: nn.Module, layers: list[str], input_shape: list[int], *,
                        batch: Inputs, calibration: Inputs) -> tuple[Int8Form | None, str | None]:
    """``model`` with ``layers`` on static int8, calibrated on ``calibration``; or None and
    why not. Static int8 needs the model's graph (torch.fx must trace it), and a graph can
    trace and still fail on int8 tensors (torchvision's ResNet adds its residual in place,
    ``out += identity``, which the int8 graph leaves as a float op on int8 inputs), so the
    converted form must also run on ``batch``. That run is its first call, and the form is
    what a plan times as "all int8": it is not prepared and converted again."""
    def why(exc: Exception) -> str:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    try:
        with _quiet():
            prepared = _prepare_static(model, layers, input_shape)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, ... on dynamic code
        return None, f"torch.fx cannot trace it with one input tensor: {why(exc)}"
    calibrated = _calibrated(prepared, calibration)
    ranges = _ranges(calibrated)
    try:  # (torch.fx prints the failing line of its generated code to stderr: not ours)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            converted = _converted(calibrated)
            call_model(converted, batch)
    except Exception as exc:  # the quantized kernels raise RuntimeError, NotImplementedError...
        return None, f"its int8 graph fails to run: {why(exc)}"
    return Int8Form(converted, ranges), None


def _calibrated(prepared: nn.Module, data: torch.Tensor) -> nn.Module:
    """``prepared`` after its observers have seen ``data`` (in place)."""
    with _quiet(), torch.no_grad():
        for start in range(0, batch_len(data), 256):
            call_model(prepared, take(data, slice(start, start + 256)))
    return prepared


def _ranges(calibrated: nn.Module) -> dict[str, list[float]]:
    return {n: [float(o.min_val), float(o.max_val)] for n, o in _observers(calibrated).items()}


def _converted(calibrated: nn.Module) -> nn.Module:
    """The int8 model a calibrated one makes: what ``build_executable`` builds from its
    ranges, without preparing the model again (a preparation traces the whole model: 35 ms
    for a digits-cnn student, and plans made 6.5 per trial over 15 trials)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        return convert_fx(calibrated).eval()


def _calibrate(model: nn.Module, layers: list[str], input_shape: list[int],
               data: torch.Tensor) -> dict[str, list[float]]:
    with _quiet():
        prepared = _prepare_static(model, layers, input_shape)
    return _ranges(_calibrated(prepared, data))


def _time(forms: dict[str, nn.Module], x: torch.Tensor, threads: int,
          **protocol: float) -> dict[str, float]:
    """Median milliseconds per call of each form on ``x`` on CPU, timed in turns so that a
    machine slowing down meanwhile cannot decide between them (a choice, not an objective),
    and only until the choice is clear (``compare_latency``'s ``decided_at``: does the
    fastest form beat float by MARGIN?). ``protocol``: compare_latency's rounds and
    window_s, when not its defaults."""
    calls = {k: torch.no_grad()(f if isinstance(x, torch.Tensor) else functools.partial(call_model, f))
             for k, f in forms.items()}
    return compare_latency(calls, x, threads=threads, decided_at=1 - MARGIN, **protocol)


#: int8 must beat float by this fraction to run: a tie in a quick timing is not a win.
MARGIN = 0.05
#: A single layer is timed in fewer, shorter rounds than a whole model (a layer call takes
#: microseconds, so a 1 ms window still holds dozens of calls). A layer's timing only
#: proposes: no model runs int8 unless its whole form beat float; a near-tie misjudged here
#: costs at most a missed speedup. New layer shapes come with most trials, so this was most
#: of the plan's time: 44.6 -> 25.8 ms per new dynamic Linear shape (median of 8, measured
#: on the reference VM).
LAYER_PROTOCOL = {"rounds": 6, "window_s": 0.001}
#: The whole model's forms are timed for at most this many rounds: a choice the rounds have
#: not made by then is a near-tie (a form within a few percent of the margin), and either
#: answer is as fast as the other within that. (At 10, one dynamic student at 0.99 of float
#: took 2.0 s of its 4-5 s trial.) No warm-up before the rounds: the first round's untimed
#: call of each form is one (a call of a new form at batch 256 ran 1.1-2x slow, the second
#: within 4% of the steady speed); the comparisons' warm-ups took 1.2 s of the plans' 10 s in
#: a 25-trial digits-cnn search at batch 256 (cProfile, layers' and whole models' together).
MODEL_PROTOCOL = {"rounds": 6, "warmup_s": 0.0}

_LAYER_CACHE: dict[tuple, tuple[float, float]] = {}
#: Whole-model decisions by form (see plan_execution): the plans, without their ranges.
_MODEL_CACHE: dict[tuple, ExecutionPlan] = {}


def _layer_times(layer: nn.Module, x: torch.Tensor, mode: str, threads: int) -> tuple[float, float]:
    """(float ms, int8 ms) of one layer alone on input ``x``, int8 including the quantize and
    dequantize at its borders (so the choice errs towards float). Cached by shape."""
    key = (type(layer).__name__, tuple(layer.weight.shape), getattr(layer, "stride", None),
           getattr(layer, "padding", None), getattr(layer, "dilation", None),
           getattr(layer, "groups", None), layer.bias is not None, tuple(x.shape), mode,
           torch.backends.quantized.engine, threads)
    if key not in _LAYER_CACHE:
        single = nn.Sequential(copy.deepcopy(layer)).eval()
        if mode == "static":
            with _quiet():
                int8_form = _converted(_calibrated(_prepare_static(single, ["0"],
                                                                   list(x.shape[1:])), x))
        else:
            int8_form = build_executable(single, ExecutionPlan(
                mode=mode, layers={"0": "int8"}, input_shape=list(x.shape[1:]),
                engine=torch.backends.quantized.engine))
        timed = _time({"float": single, "int8": int8_form}, x, threads, **LAYER_PROTOCOL)
        _LAYER_CACHE[key] = (timed["float"], timed["int8"])
    return _LAYER_CACHE[key]


def plan_execution(model: nn.Module, layer_bits: dict[str, int], *, batch: Inputs,
                   calibration: Inputs | Callable[[], Inputs], activation_bits: int, threads: int,
                   symmetric: bool = True,
                   ops_engine: str | None = OPS_ENGINE) -> ExecutionPlan | None:
    """Decide, by measurement at the target batch ``batch``, which layers run int8.

    Candidates are Conv2d/Linear layers whose weights have <= 8 bits (with float activations
    only Linear has a kernel). Asymmetric weights are not candidates: the int8 kernels take
    symmetric weights, and requantizing would run other weights than the file stores.
    ``calibration``: the inputs a static plan calibrates its activation ranges on, or a
    function returning them (read only when a static plan needs them). ``ops_engine``: also
    tried for a static form's ops without weights (OPS_ENGINE); None where the model will be
    traced (TorchScript). Returns None when there is no candidate or no int8 engine.
    """
    name_of_engine = engine()
    if name_of_engine is None or not symmetric:
        return None
    # read only when a static plan calibrates (a callable: the caller reads it then)
    samples = calibration if callable(calibration) else lambda: calibration
    torch.backends.quantized.engine = name_of_engine
    modules = dict(model.named_modules())
    low_bits = [n for n, b in layer_bits.items()
                if b <= 8 and isinstance(modules.get(n), nn.Conv2d | nn.Linear)]
    asked = "static" if activation_bits == 8 else "dynamic"
    # static int8 is traced with one input tensor (its shape is in the plan); a model that
    # takes several, or a dict, runs dynamic int8 (its Linear layers)
    one_tensor = isinstance(batch, torch.Tensor)
    input_shape = list(batch.shape[1:]) if one_tensor else []
    # The decision depends on shapes, code and kernels, not on weight values: a model of a
    # form already decided in this process reuses it (a static plan's ranges are calibrated
    # on the model itself). Whether torch.fx traces it is a matter of its code, in the form.
    key = (json.dumps(module_form(model)), tuple(low_bits), asked, threads, describe(batch),
           name_of_engine, ops_engine)
    if key in _MODEL_CACHE:  # a copy: its ranges and its note are this model's
        plan = copy.deepcopy(_MODEL_CACHE[key])
        plan.decisions["model"]["reused"] = "same form decided earlier in this process"
        if plan.int8_layers and plan.mode == "static":
            plan.ranges = _calibrate(model, plan.int8_layers, input_shape, samples())
        return plan
    mode, untraceable, all_int8 = asked, None, None
    if asked == "static" and not one_tensor:
        mode, untraceable = "dynamic", f"the model takes {describe(batch)}, not one tensor"
    elif asked == "static" and low_bits:
        all_int8, untraceable = _static_int8_or_why(model, low_bits, input_shape, batch=batch,
                                                    calibration=samples())
        if all_int8 is None:  # e.g. data-dependent control flow in forward
            mode = "dynamic"
    kinds = nn.Conv2d | nn.Linear if mode == "static" else nn.Linear
    candidates = [n for n in low_bits if isinstance(modules[n], kinds)]
    if not candidates:
        return None
    plan = ExecutionPlan(mode=mode, layers=dict.fromkeys(candidates, "float"),
                         input_shape=input_shape, engine=name_of_engine)
    if untraceable is not None:
        plan.decisions["static"] = f"dynamic int8 instead of static: {untraceable}"
    # Static int8 is first tried whole: a chain of int8 layers pays no quantize/dequantize
    # between them, and when it beats float the choice is made. Each layer alone is timed only
    # when it does not, for a mix (at batch 1, where int8 kernels lose to float on small CPUs).
    # At batch 256 a per-layer mix beat all-int8 in 3 of 13 digits-cnn plans, by 1.5-4.5%:
    # under MARGIN, a tie by the plan's own rule; without its layer timings and its extra form
    # the plans of a 25-trial search took 6 s instead of 10.
    # another engine for a static form's other ops (dynamic int8 runs them in float)
    ops_engine = (ops_engine if mode == "static" and ops_engine != name_of_engine
                  and ops_engine in torch.backends.quantized.supported_engines else None)
    if all_int8 is None or not _choose_for_the_whole_model(
            model, plan, {"all int8": dict.fromkeys(candidates, "int8")}, batch=batch,
            calibration=samples, threads=threads, ready=all_int8, ops_engine=ops_engine):
        inputs = layer_inputs(model.eval(), candidates, batch)
        per_layer = {}
        for name in candidates:
            float_ms, int8_ms = _layer_times(modules[name], inputs[name], mode, threads)
            per_layer[name] = "int8" if int8_ms < (1 - MARGIN) * float_ms else "float"
            plan.decisions[name] = {"float_ms": round(float_ms, 4), "int8_ms": round(int8_ms, 4)}
        # (static, and every layer faster on int8 alone: that is all-int8, which lost)
        if all_int8 is None or "float" in per_layer.values():
            _choose_for_the_whole_model(model, plan, {"per layer": per_layer}, batch=batch,
                                        calibration=samples, threads=threads,
                                        ops_engine=ops_engine)
    _MODEL_CACHE[key] = replace(copy.deepcopy(plan), ranges={})
    return plan


def _choose_for_the_whole_model(model: nn.Module, plan: ExecutionPlan,
                                options: dict[str, dict[str, str]], *, batch: Inputs,
                                calibration: Callable[[], Inputs], threads: int,
                                ready: Int8Form | None = None,
                                ops_engine: str | None = None) -> bool:
    """Time the whole model on float and on ``options`` (label: each candidate layer's
    kernel) and keep the fastest in ``plan`` when it beats float by MARGIN; whether one did.

    Static options are prepared, calibrated and converted (``ready``: the option that puts
    every candidate on int8, already built); dynamic ones are built from the plan. With an
    ``ops_engine``, each option is also timed with that engine set while it runs (the same
    module: only the kernels of its pooling and adds change).
    The timings are added to ``plan.decisions["model"]``, beside those of earlier calls."""
    record = plan.decisions.setdefault("model", {})
    forms: dict[str, nn.Module] = {"float": model}
    built: dict[str, ExecutionPlan] = {}
    for label, layers in options.items():
        if "int8" not in layers.values():
            continue
        option = ExecutionPlan(mode=plan.mode, layers=dict(layers), input_shape=plan.input_shape,
                               engine=plan.engine, decisions=plan.decisions)
        if plan.mode == "static" and ready is not None and "float" not in layers.values():
            forms[label], option.ranges = ready.module, ready.ranges
        elif plan.mode == "static":
            with _quiet():
                prepared = _prepare_static(model, option.int8_layers, plan.input_shape)
            calibrated = _calibrated(prepared, calibration())
            option.ranges = _ranges(calibrated)
            forms[label] = _converted(calibrated)
        else:
            forms[label] = build_executable(model, option)
        built[label] = option
        if ops_engine is not None:
            on_engine = f"{label}, {ops_engine} ops"
            forms[on_engine] = OnEngine(forms[label], ops_engine)
            built[on_engine] = replace(option, ops_engine=ops_engine)
    if not built:
        record.update({"chosen": "float", "why": "no layer was faster on int8"})
        return False
    timings = _time(forms, batch, threads, **MODEL_PROTOCOL)
    best = min(built, key=timings.get)
    if built[best].ops_engine is not None:  # another engine only where it wins, not in a tie
        same = best.removesuffix(f", {ops_engine} ops")
        if timings[best] >= (1 - MARGIN) * timings[same]:
            best = same
    record.update({f"{k} ms": round(v, 4) for k, v in timings.items()})
    if timings[best] >= (1 - MARGIN) * timings["float"]:  # never slower by accident, as a whole
        record["chosen"] = "float"
        return False
    record["chosen"] = best
    plan.layers, plan.ranges = built[best].layers, built[best].ranges
    plan.ops_engine = built[best].ops_engine
    return True
