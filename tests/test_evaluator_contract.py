"""Contract suite: every default evaluator measures the executable form of every registered
runtime and returns named, finite figures, so a new evaluator or runtime is checked the moment
it is registered."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from slimsearch.compression import CompressedModel, load_float_model, save_artifact
from slimsearch.evaluators import (
    DEFAULT_EVALUATORS,
    EvalContext,
    Evaluator,
    SizeEvaluator,
    evaluate,
)
from slimsearch.experiment import TargetConfig
from slimsearch.runtimes import RUNTIMES
from slimsearch.tasks import Task, factory_path
from slimsearch.tasks.digits import digits_mlp

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMSEARCH_LOCK_DIR", str(tmp_path / "locks"))


def _context(runtime: str, folder: Path, task: Task) -> EvalContext:
    torch.manual_seed(0)
    model = digits_mlp(width=0.25).eval()
    path = save_artifact(CompressedModel(model, factory_path(digits_mlp), {"width": 0.25}),
                         folder / "model.safetensors")
    target = TargetConfig(device="cpu", runtime=runtime, batch_sizes=(1, 4))
    RUNTIMES[runtime].check(target, CPU)
    executable = RUNTIMES[runtime].materialize(path, target=target, device=CPU, out_dir=folder,
                                               example=task.example_inputs(1))
    return EvalContext(task=task, executable=executable, model=load_float_model(path),
                       target=target, device=CPU)


@pytest.mark.parametrize("runtime", list(RUNTIMES))
@pytest.mark.parametrize("evaluator", DEFAULT_EVALUATORS, ids=lambda e: e.name)
def test_every_evaluator_measures_every_runtime(evaluator: Evaluator, runtime: str,
                                                tmp_path: Path, digits_mlp_task: Task) -> None:
    context = _context(runtime, tmp_path, digits_mlp_task)
    found = evaluator(context)
    assert evaluator.name in found, f"{evaluator.name} must report a figure under its own name"
    for key, value in found.items():
        assert isinstance(key, str) and key == key.lower()
        if isinstance(value, float):
            assert math.isfinite(value), f"{key} = {value}"
    figure = found[evaluator.name]
    assert isinstance(figure, int | float) and figure >= 0
    # a figure of the executable form, not of something else: the file's own bytes here
    if evaluator.name == "size_bytes":
        assert figure == context.artifact.stat().st_size


def test_evaluate_merges_the_figures_and_refuses_a_clash(tmp_path: Path,
                                                         digits_mlp_task: Task) -> None:
    context = _context("torch", tmp_path, digits_mlp_task)
    metrics = evaluate(context)
    assert {e.name for e in DEFAULT_EVALUATORS} <= set(metrics)
    assert metrics["parameters"] == sum(p.numel() for p in context.model.parameters())
    with pytest.raises(ValueError, match="reports .* again"):
        evaluate(context, [SizeEvaluator(), SizeEvaluator()])
