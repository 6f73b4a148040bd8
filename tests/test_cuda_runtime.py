"""Real CUDA execution: the plan records per layer what runs (int8/int4 weight-only, 2:4 sparse,
float) and why; ``build_cuda_executable`` rebuilds exactly that, or refuses clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimsearch.compression.pruning import nm_masks
from slimsearch.errors import ArtifactError
from slimsearch.runtimes import ExecutionPlan
from slimsearch.runtimes import cuda as cuda_runtime
from slimsearch.runtimes.cuda import CudaCandidate, build_cuda_executable, plan_cuda_execution
from slimsearch.spaces.recipe import LayerRecipe

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def _plan(layers: dict[str, str]) -> ExecutionPlan:
    return ExecutionPlan(mode="cuda", layers=layers, input_shape=[256], engine="torchao")


# --- CPU: runs everywhere --------------------------------------------------------------------

def test_plan_is_none_off_cuda() -> None:
    plan = plan_cuda_execution(_mlp(), {"0": CudaCandidate(8, "2:4"), "2": (4, None)},
                               batch=torch.randn(8, 256), dtype=torch.float32,
                               device=torch.device("cpu"))
    assert plan is None


def test_float_only_plan_returns_the_model_itself() -> None:
    model = _mlp()
    assert build_cuda_executable(model, _plan({"0": "float", "2": "float"})) is model


def test_missing_torchao_is_a_clear_artifact_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_runtime, "_torchao", lambda: (None, cuda_runtime.TORCHAO_MISSING))
    with pytest.raises(ArtifactError, match=r"layers \['0'\].*torchao not installed \(pip install torchao\)"):
        build_cuda_executable(_mlp(), _plan({"0": "int8-weight-only", "2": "float"}))


def test_impossible_kernels_are_artifact_errors() -> None:
    model = _mlp()
    with pytest.raises(ArtifactError, match="runs on CUDA only"):
        build_cuda_executable(model, _plan({"0": "2:4-sparse"}))
    with pytest.raises(ArtifactError, match="unknown kernel"):
        build_cuda_executable(model, _plan({"0": "int3-magic"}))
    with pytest.raises(ArtifactError, match="lacks"):
        build_cuda_executable(model, _plan({"9": "2:4-sparse"}))
    with pytest.raises(ArtifactError, match="mode 'dynamic'"):
        build_cuda_executable(model, ExecutionPlan(mode="dynamic", layers={"0": "int8"},
                                                   input_shape=[256], engine="x86"))


def test_candidates_from_tuples_and_recipes() -> None:
    assert cuda_runtime._as_candidate((4, "2:4")) == CudaCandidate(4, "2:4")
    assert cuda_runtime._as_candidate(LayerRecipe(sparsity=0.5, pruning="2:4", bits=8)) == (8, "2:4")
    # pruning "2:4" with sparsity 0 prunes nothing: not a sparse candidate
    assert cuda_runtime._as_candidate(LayerRecipe(pruning="2:4", bits=32)).pattern is None
    assert cuda_runtime._wanted(CudaCandidate(4, "2:4")) == ["int8-weight-only", "2:4-sparse",
                                                             "int4-weight-only"]
    assert cuda_runtime._wanted(CudaCandidate(16, None)) == []


def test_2_4_pattern_check() -> None:
    layer = nn.Linear(32, 16)
    assert not cuda_runtime._is_2_4(layer.weight)
    nm_masks({"l": layer}, ["l"], n=2, m=4)
    assert cuda_runtime._is_2_4(layer.weight)


def test_int8_weight_only_replaces_only_the_named_layers() -> None:
    """torchao's quantize_ with the plan's filter (runs where torchao is installed)."""
    pytest.importorskip("torchao")
    quantization, reason = cuda_runtime._torchao()
    assert reason is None
    model, x = _mlp(), torch.randn(4, 256)
    reference = model(x)
    cuda_runtime._apply_kernels(model, {"0": "int8-weight-only"}, quantization)
    assert type(model[0].weight) is not nn.Parameter and type(model[2].weight) is nn.Parameter
    torch.testing.assert_close(model(x), reference, atol=2e-2, rtol=2e-2)


# --- CUDA -------------------------------------------------------------------------------------

def _sparse_mlp(device: torch.device) -> nn.Sequential:
    model = _mlp()
    nm_masks({"0": model[0]}, ["0"], n=2, m=4)
    return model.to(device=device, dtype=torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
def test_plan_decides_every_candidate_and_the_executable_matches() -> None:
    device = torch.device("cuda")
    model = _sparse_mlp(device)
    batch = torch.randn(64, 256, device=device, dtype=torch.bfloat16)
    plan = plan_cuda_execution(model, {"0": (8, "2:4"), "2": CudaCandidate(4, None)}, batch=batch,
                               dtype=torch.bfloat16, device=device)
    assert plan is not None and plan.mode == "cuda" and set(plan.layers) == {"0", "2"}
    assert set(plan.layers.values()) <= set(cuda_runtime.KERNELS)
    for name, kernels in {"0": ["int8-weight-only", "2:4-sparse"],
                          "2": ["int8-weight-only", "int4-weight-only"]}.items():
        record = plan.decisions[name]
        assert record["float_ms"] > 0
        for kernel in kernels:  # measured, or the reason it was not possible
            assert f"{kernel}_ms" in record or f"{kernel}_skipped" in record
    assert "model" in plan.decisions
    executable = build_cuda_executable(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(executable(batch), model(batch), atol=0.1, rtol=0.05)
    for name, how in plan.layers.items():
        if how == "2:4-sparse":
            weight = dict(executable.named_modules())[name].weight
            assert isinstance(weight, torch.sparse.SparseSemiStructuredTensor)


@pytest.mark.gpu
@requires_cuda
def test_forced_2_4_sparse_runs_the_sparse_kernel() -> None:
    device = torch.device("cuda")
    model = _sparse_mlp(device)
    batch = torch.randn(64, 256, device=device, dtype=torch.bfloat16)
    executable = build_cuda_executable(model, ExecutionPlan(
        mode="cuda", layers={"0": "2:4-sparse", "2": "float"}, input_shape=[256], engine="torch"))
    assert isinstance(executable[0].weight, torch.sparse.SparseSemiStructuredTensor)
    assert type(model[0].weight) is nn.Parameter  # the float model is left as it was
    with torch.no_grad():
        torch.testing.assert_close(executable(batch), model(batch), atol=0.05, rtol=0.02)


@pytest.mark.gpu
@requires_cuda
def test_float32_2_4_is_refused_with_the_reason() -> None:
    device = torch.device("cuda")
    model = _mlp()
    nm_masks({"0": model[0]}, ["0"], n=2, m=4)
    model = model.to(device)
    plan = plan_cuda_execution(model, {"0": (32, "2:4")}, batch=torch.randn(8, 256, device=device),
                               dtype=torch.float32, device=device)
    assert plan is not None and plan.layers == {"0": "float"}
    assert "float16/bfloat16" in plan.decisions["0"]["2:4-sparse_skipped"]
