"""Real int8 execution: the plan stored in the model file rebuilds the same int8 model."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from slimsearch.compression import CompressedModel, read_header, save_artifact
from slimsearch.compression.quantization import quantize_layers_
from slimsearch.runtimes import (
    ExecutionPlan,
    build_executable,
    engine,
    int8,
    load_model,
    plan_execution,
)
from slimsearch.runtimes.int8 import MARGIN, OPS_ENGINE, OnEngine, _calibrate
from slimsearch.tasks import factory_path
from slimsearch.tasks.digits import digits_cnn, digits_mlp
from slimsearch.tasks.digits_resnet import digits_resnet

pytestmark = pytest.mark.skipif(engine() is None, reason="this torch build has no int8 CPU engine")


def _compressed(factory, kwargs: dict, bits: int) -> CompressedModel:
    torch.manual_seed(0)
    model = factory(**kwargs).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    quantized = quantize_layers_(layers, dict.fromkeys(layers, bits))
    return CompressedModel(model, factory_path(factory), kwargs, quantized=quantized)


def _forced_plan(model: nn.Module, mode: str, shape: list[int], data: torch.Tensor) -> ExecutionPlan:
    kinds = (nn.Conv2d, nn.Linear) if mode == "static" else (nn.Linear,)
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    plan = ExecutionPlan(mode=mode, layers=dict.fromkeys(names, "int8"), input_shape=shape,
                         engine=engine())
    if mode == "static":
        plan.ranges = _calibrate(model, names, shape, data)
    return plan


@pytest.mark.parametrize(("factory", "kwargs", "shape", "mode", "ops_engine"), [
    (digits_cnn, {"width": 0.5}, [1, 32, 32], "static", None),
    (digits_cnn, {"width": 0.5}, [1, 32, 32], "static", OPS_ENGINE),
    (digits_resnet, {"width": 0.5, "depth": 1}, [1, 32, 32], "static", None),
    (digits_resnet, {"width": 0.5, "depth": 1}, [1, 32, 32], "static", OPS_ENGINE),
    (digits_mlp, {"width": 0.5}, [64], "dynamic", None),
])
def test_int8_model_file_reloads_to_the_same_int8_model(tmp_path: Path, factory, kwargs: dict,
                                                        shape: list[int], mode: str,
                                                        ops_engine: str | None) -> None:
    compressed = _compressed(factory, kwargs, bits=4)
    data = torch.randn(64, *shape)
    plan = _forced_plan(compressed.model, mode, shape, data)
    plan.ops_engine = ops_engine
    compressed.execution = plan.to_dict()
    path = save_artifact(compressed, tmp_path / "model.safetensors")
    loaded = load_model(path)
    # really on int8 kernels: quantized modules replaced the float ones
    kinds = {type(m).__module__ for m in loaded.modules()}
    assert any("quantized" in k for k in kinds), kinds
    expected = build_executable(compressed.model, plan)(data)
    assert torch.equal(loaded(data), expected)
    assert isinstance(loaded, OnEngine) == (ops_engine is not None)
    # close to the float model it came from (int8 activations cost a little precision)
    reference = compressed.model(data)
    assert (expected - reference).abs().max() < 0.1 * reference.abs().max() + 0.05
    torch.save(data, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "y.pt")
    script = textwrap.dedent(f"""
        import torch, slimsearch
        model = slimsearch.load_model({str(path)!r})
        x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})
        print(torch.equal(model(x), y))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_plan_measures_every_candidate_and_never_picks_an_unmeasured_layer() -> None:
    compressed = _compressed(digits_cnn, {"width": 0.5}, bits=8)
    bits = {n: 8 for n, m in compressed.model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    bits["fc2"] = 32  # a float layer is never a candidate
    batch = torch.randn(8, 1, 32, 32)
    plan = plan_execution(compressed.model, bits, batch=batch, calibration=batch, activation_bits=8,
                          threads=1)
    assert set(plan.layers) == {n for n, b in bits.items() if b <= 8}
    model_level = plan.decisions["model"]
    chosen = model_level["chosen"]
    whole = chosen.startswith("all int8")
    # the whole model on int8 is timed first, its ops on either engine; each layer alone only
    # when that lost to float
    assert {"all int8 ms", f"all int8, {OPS_ENGINE} ops ms"} <= set(model_level)
    if not whole:
        assert all({"float_ms", "int8_ms"} <= set(plan.decisions[n]) for n in plan.layers)
    # what runs is int8 only with a clear margin over float, timed in the same turns
    if chosen != "float":
        assert model_level[f"{chosen} ms"] < (1 - MARGIN) * model_level["float ms"]
    assert plan.ops_engine == (OPS_ENGINE if chosen.endswith(f"{OPS_ENGINE} ops") else None)
    if chosen == "float":
        assert plan.int8_layers == [] and plan.ranges == {}
    elif whole:
        assert set(plan.int8_layers) == set(plan.layers) and plan.ranges
    else:
        for name, how in plan.layers.items():
            faster = plan.decisions[name]["int8_ms"] < (1 - MARGIN) * plan.decisions[name]["float_ms"]
            assert how == ("int8" if faster else "float")


@pytest.mark.parametrize("all_int8_wins", [True, False])
def test_layers_are_timed_alone_only_when_the_whole_model_on_int8_loses(
        monkeypatch: pytest.MonkeyPatch, all_int8_wins: bool) -> None:
    import slimsearch.runtimes.int8 as int8

    compressed = _compressed(digits_cnn, {"width": 0.5}, bits=8)
    bits = {n: 8 for n, m in compressed.model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)}
    timed_forms: list[set[str]] = []
    alone: list[str] = []
    first = next(iter(bits))

    def fake_time(forms: dict, x: object, threads: int, **protocol: float) -> dict[str, float]:
        timed_forms.append(set(forms))
        times = {"float": 10.0, "all int8": 3.0 if all_int8_wins else 11.0, "per layer": 8.0}
        return {label: times[label.split(",")[0]] for label in forms}  # engines tie

    def fake_layer_times(layer: nn.Module, x: object, mode: str, threads: int):
        alone.append(mode)
        return (1.0, 2.0) if layer is compressed.model.get_submodule(first) else (1.0, 0.5)

    monkeypatch.setattr(int8, "_time", fake_time)
    monkeypatch.setattr(int8, "_layer_times", fake_layer_times)
    monkeypatch.setattr(int8, "_MODEL_CACHE", {})
    batch = torch.randn(8, 1, 32, 32)
    plan = plan_execution(compressed.model, bits, batch=batch, calibration=batch,
                          activation_bits=8, threads=1)
    ops = f"{OPS_ENGINE} ops"
    if all_int8_wins:  # decided whole: no layer timed alone, no mixed form built
        assert timed_forms == [{"float", "all int8", f"all int8, {ops}"}] and alone == []
        assert plan.decisions["model"]["chosen"] == "all int8"
        assert set(plan.int8_layers) == set(bits) and plan.ranges
    else:  # all-int8 lost: each layer timed alone, and the mix they propose timed whole
        assert timed_forms == [{"float", "all int8", f"all int8, {ops}"},
                               {"float", "per layer", f"per layer, {ops}"}]
        assert len(alone) == len(bits)
        assert plan.decisions["model"]["chosen"] == "per layer"
        assert plan.layers[first] == "float"
        assert set(plan.int8_layers) == set(bits) - {first}
    assert plan.ops_engine is None  # a tie keeps the weights' engine


@pytest.mark.parametrize(("plain_ms", "on_ops_engine_ms", "expected"), [
    (5.0, 3.0, OPS_ENGINE),  # faster by more than the margin
    (5.0, 4.9, None),        # a tie keeps the weights' engine
    (5.0, 6.0, None),
])
def test_the_ops_engine_runs_where_it_was_measured_faster(
        monkeypatch: pytest.MonkeyPatch, plain_ms: float, on_ops_engine_ms: float,
        expected: str | None) -> None:
    import slimsearch.runtimes.int8 as int8

    compressed = _compressed(digits_cnn, {"width": 0.5}, bits=8)
    bits = {n: 8 for n, m in compressed.model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)}
    seen: dict[str, nn.Module] = {}

    def fake_time(forms: dict, x: object, threads: int, **protocol: float) -> dict[str, float]:
        seen.update(forms)
        return {"float": 10.0, "all int8": plain_ms, f"all int8, {OPS_ENGINE} ops": on_ops_engine_ms}

    monkeypatch.setattr(int8, "_time", fake_time)
    monkeypatch.setattr(int8, "_MODEL_CACHE", {})
    batch = torch.randn(8, 1, 32, 32)
    plan = plan_execution(compressed.model, bits, batch=batch, calibration=batch,
                          activation_bits=8, threads=1)
    assert plan.ops_engine == expected and set(plan.int8_layers) == set(bits)
    # the form timed on the other engine is the same int8 module, run with that engine set
    on_engine = seen[f"all int8, {OPS_ENGINE} ops"]
    assert isinstance(on_engine, OnEngine) and on_engine.module is seen["all int8"]
    # traced runtimes are never offered it (a trace does not carry the engine)
    int8._MODEL_CACHE.clear()
    seen.clear()
    plan_execution(compressed.model, bits, batch=batch, calibration=batch, activation_bits=8,
                   threads=1, ops_engine=None)
    assert set(seen) == {"float", "all int8"}


def test_on_engine_runs_with_its_engine_and_sets_the_previous_one_back() -> None:
    compressed = _compressed(digits_cnn, {"width": 0.5}, bits=8)
    data = torch.rand(16, 1, 32, 32)
    plan = _forced_plan(compressed.model, "static", [1, 32, 32], data)
    plain = build_executable(compressed.model, plan)
    plan.ops_engine = OPS_ENGINE
    on_engine = build_executable(compressed.model, plan)
    engines: list[str] = []
    on_engine.module.register_forward_pre_hook(
        lambda *_: engines.append(torch.backends.quantized.engine))
    before = torch.backends.quantized.engine
    # the same kernels for Conv2d and Linear (their packed weights), the other engine's max
    # pooling: max is exact, so the outputs are identical
    assert torch.equal(on_engine(data), plain(data))
    assert engines == [OPS_ENGINE] and torch.backends.quantized.engine == before


def test_float_activations_only_put_linear_layers_on_int8() -> None:
    compressed = _compressed(digits_cnn, {"width": 0.5}, bits=8)
    bits = {n: 8 for n, m in compressed.model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    batch = torch.randn(4, 1, 32, 32)
    plan = plan_execution(compressed.model, bits, batch=batch, calibration=batch, activation_bits=32,
                          threads=1)
    assert set(plan.layers) == {"fc1", "fc2"} and plan.mode == "dynamic"


def test_no_candidate_means_no_plan() -> None:
    model = digits_mlp(width=0.25).eval()
    assert plan_execution(model, {"hidden.0": 32, "hidden.1": 32, "head": 32},
                          batch=torch.randn(1, 64), calibration=torch.randn(8, 64),
                          activation_bits=8, threads=1) is None


def test_int8_kernels_run_exactly_the_stored_8_bit_weights() -> None:
    compressed = _compressed(digits_mlp, {"width": 0.5}, bits=8)
    plan = _forced_plan(compressed.model, "dynamic", [64], torch.randn(8, 64))
    executable = build_executable(compressed.model, plan)
    for name, q in compressed.quantized.items():
        weight = executable.get_submodule(name).weight()
        assert torch.equal(weight.int_repr().to(torch.int16), q.codes)


def test_asymmetric_weights_are_not_int8_candidates() -> None:
    compressed = _compressed(digits_cnn, {"width": 0.5}, bits=8)
    bits = {n: 8 for n, m in compressed.model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert plan_execution(compressed.model, bits, batch=torch.randn(2, 1, 32, 32),
                          calibration=torch.randn(2, 1, 32, 32), activation_bits=8, threads=1,
                          symmetric=False) is None


class DataDependent(nn.Module):
    """forward branches on the data: torch.fx cannot trace it, so static int8 is impossible."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.fc(x))
        if hidden.sum() > 0:
            hidden = hidden * 2
        return self.head(hidden)


def test_untraceable_model_falls_back_to_dynamic_int8_and_says_why() -> None:
    torch.manual_seed(0)
    model = DataDependent().eval()
    plan = plan_execution(model, {"fc": 8, "head": 8}, batch=torch.randn(64, 64),
                          calibration=torch.randn(64, 64), activation_bits=8, threads=1)
    assert plan.mode == "dynamic" and "cannot trace" in plan.decisions["static"]
    executable = build_executable(model, plan)
    assert executable(torch.randn(3, 64)).shape == (3, 10)


def test_the_model_file_stores_what_runs_not_the_timings_that_chose_it(tmp_path: Path) -> None:
    compressed = _compressed(digits_cnn, {"width": 0.25, "fc_width": 0.25}, bits=8)
    data = torch.randn(64, 1, 32, 32)
    plan = _forced_plan(compressed.model, "static", [1, 32, 32], data)
    sizes, headers = [], []
    for i, decisions in enumerate([
            {"model": {"float ms": 16.3947, "all int8 ms": 5.2105, "chosen": "all int8"}},
            {"model": {"float ms": 9.1, "all int8 ms": 3.25, "chosen": "all int8",
                       "reused": "same form decided earlier in this process"}}]):
        plan.decisions = decisions
        compressed.execution = plan.to_dict()
        path = save_artifact(compressed, tmp_path / str(i) / "model.safetensors")
        sizes.append(path.stat().st_size)
        headers.append(read_header(path)["execution"])
        assert torch.equal(load_model(path)(data), build_executable(compressed.model, plan)(data))
    # the same model runs the same way: the same bytes, whatever the timings read
    assert sizes[0] == sizes[1]
    assert headers[0] == headers[1] and "decisions" not in headers[0]
    assert headers[0]["layers"] == plan.layers and headers[0]["ranges"] == plan.ranges


def test_a_form_already_decided_reuses_the_decision_and_recalibrates() -> None:
    int8._MODEL_CACHE.clear()  # decided afresh here, whatever ran before in this process
    first = _compressed(digits_cnn, {"width": 0.25, "fc_width": 0.25}, bits=8).model
    torch.manual_seed(7)
    second = digits_cnn(width=0.25, fc_width=0.25).eval()  # same shapes, other weights
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(3.0)  # other activation ranges too
    bits = {n: 8 for n, m in first.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    batch, data = torch.randn(256, 1, 32, 32), torch.randn(64, 1, 32, 32)
    kwargs = dict(batch=batch, calibration=data, activation_bits=8, threads=1)
    a = plan_execution(first, bits, **kwargs)
    b = plan_execution(second, bits, **kwargs)
    assert "reused" not in a.decisions["model"]
    assert "reused" in b.decisions["model"] and b.layers == a.layers
    if b.int8_layers:  # calibrated on the second model itself, not copied from the first
        assert b.ranges == _calibrate(second, b.int8_layers, [1, 32, 32], data)
        assert b.ranges != a.ranges
