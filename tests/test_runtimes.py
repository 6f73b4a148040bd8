"""Runtimes: every registered runtime executes the model it was given (same outputs), ships a
file that is really there, says what executes in a signature that ignores weight values but
not shapes, kernels or batch, and refuses what it cannot execute faithfully."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from slimsearch.compression import MODEL_FILE, CompressedModel, save_artifact
from slimsearch.errors import ConfigError, TrialError
from slimsearch.experiment import TargetConfig
from slimsearch.runtimes import RUNTIMES, get_runtime, module_form
from slimsearch.runtimes.onnx import OnnxRuntime
from slimsearch.tasks import factory_path, model_factory
from slimsearch.tasks.digits import digits_cnn, digits_mlp

CPU = torch.device("cpu")


class Branchy(nn.Module):
    """Data-dependent control flow: a trace would silently keep one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


@model_factory
def branchy() -> nn.Module:
    return Branchy()


def saved(folder: Path, factory, kwargs: dict, *, seed: int = 0, name: str = MODEL_FILE) -> Path:
    torch.manual_seed(seed)
    model = factory(**kwargs).eval()
    return save_artifact(CompressedModel(model=model, factory=factory_path(factory),
                                         kwargs=dict(kwargs)), folder / name)


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMSEARCH_LOCK_DIR", str(tmp_path / "locks"))


def test_the_registry_is_the_one_list_of_runtimes(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from slimsearch.cli import main

    assert all(r.name == name and r.label for name, r in RUNTIMES.items())  # the report's name
    experiment = tmp_path / "e.toml"  # a name the registry lacks: refused before anything runs
    experiment.write_text('name = "e"\ntask = "digits-mlp"\n[target]\nruntime = "onnx"\n')
    assert main(["run", str(experiment), "--run-dir", str(tmp_path / "run")]) == 2
    assert "target.runtime = 'onnx' is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", list(RUNTIMES))
@pytest.mark.parametrize("factory, kwargs, shape", [
    (digits_mlp, {"width": 0.25, "depth": 2}, (64,)),
    (digits_cnn, {"width": 0.25, "fc_width": 0.25}, (1, 32, 32)),
])
def test_every_runtime_runs_the_same_model(name: str, factory, kwargs: dict, shape: tuple,
                                           tmp_path: Path) -> None:
    model_file = saved(tmp_path, factory, kwargs)
    target = TargetConfig(device="cpu", runtime=name)
    torch.manual_seed(1)
    x = torch.randn(5, *shape)
    executable = RUNTIMES[name].materialize(model_file, target=target, device=CPU,
                                            example=x[:1], out_dir=tmp_path)
    torch.manual_seed(0)
    expected = factory(**kwargs).eval()  # the same weights as the saved model
    with torch.no_grad():
        torch.testing.assert_close(executable.logits(x), expected(x), atol=1e-5, rtol=1e-5)
    # batch sizes other than the example's run too (the objective may be batch 1, extras 256)
    assert executable.logits(torch.randn(3, *shape)).shape == (3, 10)
    assert executable.artifact.is_file() and executable.artifact.parent == tmp_path
    assert executable.runtime == name


def test_each_runtime_ships_its_own_file(tmp_path: Path) -> None:
    model_file = saved(tmp_path, digits_mlp, {"width": 0.25, "depth": 2})
    files = {}
    for name, runtime in RUNTIMES.items():
        target = TargetConfig(device="cpu", runtime=name)
        files[name] = runtime.materialize(model_file, target=target, device=CPU, out_dir=tmp_path,
                                          example=torch.zeros(1, 64)).artifact.name
    assert files == {"torch": MODEL_FILE, "torchscript": "model.torchscript.pt",
                     "onnxruntime": "model.onnx"}


def test_signature_ignores_weight_values_but_not_shapes_batch_or_runtime(tmp_path: Path) -> None:
    a = saved(tmp_path, digits_mlp, {"width": 0.25, "depth": 2}, seed=0, name="a.safetensors")
    b = saved(tmp_path, digits_mlp, {"width": 0.25, "depth": 2}, seed=1, name="b.safetensors")
    wider = saved(tmp_path, digits_mlp, {"width": 0.5, "depth": 2}, name="c.safetensors")

    def signature(path: Path, runtime: str = "torch", batch: int = 1) -> str:
        target = TargetConfig(device="cpu", runtime=runtime)
        return RUNTIMES[runtime].materialize(path, target=target, device=CPU, out_dir=tmp_path,
                                             example=torch.zeros(1, 64)).signature(batch)

    assert signature(a) == signature(b)
    assert signature(a) != signature(wider)
    assert signature(a, batch=1) != signature(a, batch=256)
    assert signature(a) != signature(a, runtime="torchscript")


def test_the_form_of_int8_layers_ignores_their_scales() -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    layers = []
    for scale in (0.1, 0.2):
        layer = DynamicLinear(8, 4)
        weight = torch.quantize_per_tensor(torch.randn(4, 8), scale, 0, torch.qint8)
        layer.set_weight_bias(weight, None)
        layers.append(layer)
    assert module_form(layers[0]) == module_form(layers[1])
    assert module_form(layers[0]) != module_form(DynamicLinear(8, 6))


def test_torchscript_refuses_a_trace_that_would_keep_one_branch(tmp_path: Path) -> None:
    model_file = saved(tmp_path, branchy, {})
    target = TargetConfig(device="cpu", runtime="torchscript")
    with pytest.raises(TrialError, match="torchscript.*Python boolean"):
        RUNTIMES["torchscript"].materialize(model_file, target=target, device=CPU,
                                            example=torch.ones(1, 64), out_dir=tmp_path)
    assert not (tmp_path / "model.torchscript.pt").exists()


def test_onnx_export_failure_fails_the_trial_with_the_reason(tmp_path: Path) -> None:
    model_file = saved(tmp_path, branchy, {})
    target = TargetConfig(device="cpu", runtime="onnxruntime")
    with pytest.raises(TrialError, match="cannot export this model to ONNX"):
        RUNTIMES["onnxruntime"].materialize(model_file, target=target, device=CPU,
                                            example=torch.ones(1, 64), out_dir=tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_onnxruntime_not_installed_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ConfigError, match=r'pip install "slimsearch\[onnx\]"'):
        OnnxRuntime().check(TargetConfig(device="cpu", runtime="onnxruntime"), CPU)


def test_targets_a_runtime_cannot_serve_are_refused() -> None:
    onnx = RUNTIMES["onnxruntime"]
    with pytest.raises(ConfigError, match="onnxruntime.*target.device = 'cpu'"):
        onnx.check(TargetConfig(device="cuda", runtime="onnxruntime"), torch.device("cuda"))
    with pytest.raises(ConfigError, match="target.dtype = 'bf16': runtime = 'onnxruntime'"):
        onnx.check(TargetConfig(dtype="bf16", runtime="onnxruntime"), CPU)
    with pytest.raises(ConfigError, match="fp16"):
        RUNTIMES["torch"].check(TargetConfig(device="cpu", dtype="fp16"), CPU)
    with pytest.raises(ConfigError, match="target.batch_sizes"):
        TargetConfig(batch_sizes=(1, 1))
    with pytest.raises(ConfigError, match="'torchscrip' is not allowed.*Did you mean 'torchscript'"):
        get_runtime("torchscrip")


def test_bf16_on_cpu_executes_in_bf16(tmp_path: Path) -> None:
    model_file = saved(tmp_path, digits_mlp, {"width": 0.25, "depth": 2})
    target = TargetConfig(device="cpu", dtype="bf16")
    executable = RUNTIMES["torch"].materialize(model_file, target=target, device=CPU,
                                               example=torch.zeros(1, 64), out_dir=tmp_path)
    assert {p.dtype for p in executable.module.parameters()} == {torch.bfloat16}
    assert executable.logits(torch.randn(4, 64)).dtype == torch.float32  # logits come back fp32
