"""Evaluators: each measures the executable model rebuilt from the artifact file.

An evaluator is any object with a ``name`` and ``__call__(context) -> dict[str, metric]``.
``evaluate`` runs a sequence of them and merges their metrics; a name clash is a bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from slimsearch.evaluators.latency import measure_latency
from slimsearch.experiment import TargetConfig
from slimsearch.tasks import Task
from slimsearch.training import accuracy

Metric = float | int | str


@dataclass(frozen=True)
class EvalContext:
    """What every evaluator may look at: the task, the model file and the model rebuilt from it."""

    task: Task
    artifact: Path
    model: nn.Module
    target: TargetConfig
    device: torch.device


class Evaluator(Protocol):
    """Measures one aspect of the executable model; returns named metrics with units in the name."""

    name: str

    def __call__(self, context: EvalContext) -> dict[str, Metric]: ...


@dataclass(frozen=True)
class AccuracyEvaluator:
    """Top-1 accuracy (fraction 0-1) on the ``val`` or ``test`` split, and the split's size."""

    split: str = "val"

    @property
    def name(self) -> str:
        return f"{self.split}_accuracy"

    def __call__(self, context: EvalContext) -> dict[str, Metric]:
        data = getattr(context.task, self.split)
        return {self.name: accuracy(context.model, data, device=context.device),
                f"{self.split}_samples": len(data)}


@dataclass(frozen=True)
class SizeEvaluator:
    """``size_bytes``: the byte length of the deployable file, nothing estimated."""

    name: str = "size_bytes"

    def __call__(self, context: EvalContext) -> dict[str, Metric]:
        return {"size_bytes": context.artifact.stat().st_size}


@dataclass(frozen=True)
class LatencyEvaluator:
    """``latency_ms`` (median per call) and its spread, at the target's batch size."""

    name: str = "latency_ms"
    warmup: int = 100
    samples: int = 500

    def __call__(self, context: EvalContext) -> dict[str, Metric]:
        inputs = context.task.example_inputs(context.target.batch_size)
        result = measure_latency(context.model, inputs, device=context.device,
                                 threads=context.target.threads, warmup=self.warmup,
                                 samples=self.samples)
        return result.as_metrics()


DEFAULT_EVALUATORS: tuple[Evaluator, ...] = (
    AccuracyEvaluator("val"), AccuracyEvaluator("test"), SizeEvaluator(), LatencyEvaluator())


def evaluate(context: EvalContext,
             evaluators: Sequence[Evaluator] = DEFAULT_EVALUATORS) -> dict[str, Metric]:
    """Run every evaluator on ``context`` and merge their metrics."""
    metrics: dict[str, Metric] = {}
    for evaluator in evaluators:
        found = evaluator(context)
        clash = set(found) & set(metrics)
        if clash:
            raise ValueError(f"evaluator {evaluator.name!r} reports {sorted(clash)} again")
        metrics.update(found)
    metrics["parameters"] = sum(p.numel() for p in context.model.parameters())
    return metrics
