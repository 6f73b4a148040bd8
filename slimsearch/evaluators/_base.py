"""Evaluators: each measures the executable form of a model, as its runtime runs it.

An evaluator is any object with a ``name`` and ``__call__(context) -> dict[str, metric]``.
``evaluate`` runs a sequence of them and merges their metrics; a name clash is a bug.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from slimsearch.evaluators.latency_cache import LatencyCache
from slimsearch.experiment import TargetConfig
from slimsearch.runtimes import Executable
from slimsearch.tasks import Split, Task
from slimsearch.timing.latency import Latency, measure_latency
from slimsearch.timing.machine_probe import kind_for as probe_kind
from slimsearch.timing.paired import paired_latency, rested_latency
from slimsearch.training import full_fp32

Metric = float | int | str


def metric_suffix(position: int, batch: int) -> str:
    """How the figures of the target's ``position``-th batch size are named: ``latency_ms``
    for the first (the objective), ``latency_b<batch>_ms`` for the others."""
    return "" if position == 0 else f"_b{batch}"


@dataclass(frozen=True)
class Reference:
    """What a model's CPU latency is timed against (``timing.paired``): the run's teacher in
    the same runtime, and its latency (ms per call) by batch size, measured at the start of
    the run (the anchor every trial's ratio is multiplied by)."""

    executable: Executable
    anchor_ms: dict[int, float]


def reference_at_rest(executable: Executable, task: Task, target: TargetConfig) -> Reference:
    """``executable`` as the reference, with its latency at rest measured now for each of the
    target's batch sizes (``timing.rested_latency``; CPU)."""
    return Reference(executable, {
        batch: rested_latency(executable.run, executable.native(task.example_inputs(batch)),
                              threads=target.threads).median_ms
        for batch in target.batch_sizes})


@dataclass(frozen=True)
class EvalContext:
    """What every evaluator may look at: the task, the executable form of the model (with the
    artifact file its runtime ships), and the float model it was made from. ``reference``:
    time the model against it (on the CPU); None times it alone (the reference itself, a
    bundle's fresh check, CUDA)."""

    task: Task
    executable: Executable
    model: nn.Module
    target: TargetConfig
    device: torch.device
    latency_cache: LatencyCache | None = None
    reference: Reference | None = None
    #: This model is the run's reference: timed alone, at rest (``timing.rested_latency``).
    is_reference: bool = False

    @property
    def artifact(self) -> Path:
        return self.executable.artifact


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
        with full_fp32():  # TF32 would let one file classify a borderline sample two ways
            predictions = context.executable.logits(data.x).argmax(dim=1)
        return {self.name: float((predictions == data.y).float().mean()),
                f"{self.split}_samples": len(data)}


#: A teacher whose validation accuracy is no more than this (a fraction) above always
#: predicting the most common class has learned nothing worth compressing.
CHANCE_MARGIN = 0.01


def majority_accuracy(data: Split) -> float:
    """The accuracy (fraction) of always predicting ``data``'s most common class."""
    return float(torch.bincount(data.y).max()) / len(data)


def untrained_teacher(teacher: dict[str, Metric]) -> str | None:
    """A warning when the teacher's metrics (with ``val_majority_accuracy``) show it no better
    than always predicting the most common class; None otherwise."""
    chance, found = teacher.get("val_majority_accuracy"), teacher.get("val_accuracy")
    if not isinstance(chance, float) or not isinstance(found, float):
        return None
    if found > chance + CHANCE_MARGIN:
        return None
    return (f"the teacher's validation accuracy {found:.4f} is no better than always predicting "
            f"the most common class ({chance:.4f}): it learned nothing, and every trial is "
            "compared with it")


@dataclass(frozen=True)
class SizeEvaluator:
    """``size_bytes``: the byte length of the deployable file, nothing estimated."""

    name: str = "size_bytes"

    def __call__(self, context: EvalContext) -> dict[str, Metric]:
        return {"size_bytes": context.artifact.stat().st_size}


@dataclass(frozen=True)
class LatencyEvaluator:
    """``latency_ms`` (median per call), its spread, p90, samples and peak memory at the
    target's first batch size; the same as ``latency_b<N>_*`` for its other batch sizes.

    On the CPU with a reference, each figure is the model's time as a ratio to the
    reference's in the same moments, times the reference's latency at the start of the run
    (``timing.paired``); a ratio that does not settle is measured again after a pause, and if
    it never does, reported at the slow end of its interval (``latency_unstable``). Alone (the
    reference itself, CUDA), the figure of ``timing.latency``. An executed form already
    measured in this run is taken from the cache (``latency_cached``)."""

    name: str = "latency_ms"
    warmup: int = 100
    samples: int = 500

    def __call__(self, context: EvalContext) -> dict[str, Metric]:
        target, executable = context.target, context.executable
        metrics: dict[str, Metric] = {}
        for position, batch in enumerate(target.batch_sizes):
            suffix = metric_suffix(position, batch)
            key = executable.signature(batch)
            # the reference is timed at rest, never taken from the cache (but put in it: a
            # trial of the same form is the reference); a figure cached against another
            # anchor (a run from before the ratio) is measured again
            cache = context.latency_cache
            result = (cache.get(key) if cache is not None and not context.is_reference
                      else None)
            if result is not None and not self._same_footing(result, context, batch):
                result = None
            cached = result is not None
            if result is None:
                result = self._measure(context, batch)
                if cache is not None:
                    cache.put(key, result)
            metrics.update(result.as_metrics(suffix))
            metrics[f"latency{suffix}_cached"] = cached
            metrics[f"latency{suffix}_signature"] = key
        return metrics

    @staticmethod
    def _anchor(context: EvalContext, batch: int) -> float | None:
        """The reference's latency at rest at ``batch`` when this figure is timed against it
        (on the CPU, with a reference measured at that batch); None when timed alone."""
        reference = context.reference
        if reference is None or context.device.type != "cpu":
            return None
        return reference.anchor_ms.get(batch)

    @classmethod
    def _same_footing(cls, cached: Latency, context: EvalContext, batch: int) -> bool:
        """Whether a cached figure was measured the way this one would be: against the same
        anchor, or alone."""
        return cached.anchor_ms == cls._anchor(context, batch)

    def _measure(self, context: EvalContext, batch: int) -> Latency:
        target, executable = context.target, context.executable
        inputs = executable.native(context.task.example_inputs(batch))
        if (anchor := self._anchor(context, batch)) is not None:
            reference = context.reference.executable
            return paired_latency(executable.run, inputs, reference.run,
                                  reference.native(context.task.example_inputs(batch)),
                                  anchor_ms=anchor, batch_size=batch, threads=target.threads)
        if context.is_reference and context.device.type == "cpu":
            return rested_latency(executable.run, inputs, threads=target.threads)
        return measure_latency(executable.run, inputs, device=context.device,
                               threads=target.threads, warmup=self.warmup,
                               samples=self.samples, max_cv=target.max_cv,
                               max_repeats=target.max_repeats,
                               quiet_wait_s=target.quiet_wait_s,
                               cuda_graph=target.cuda_graphs, probe=probe_kind(context.model))


DEFAULT_EVALUATORS: tuple[Evaluator, ...] = (
    AccuracyEvaluator("val"), AccuracyEvaluator("test"), SizeEvaluator(), LatencyEvaluator())


def evaluate(context: EvalContext, evaluators: Sequence[Evaluator] = DEFAULT_EVALUATORS, *,
             seconds: dict[str, float] | None = None) -> dict[str, Metric]:
    """Run every evaluator on ``context`` and merge their metrics; ``seconds`` (if given)
    receives how long each evaluator took, by name."""
    metrics: dict[str, Metric] = {}
    for evaluator in evaluators:
        start = time.perf_counter()
        found = evaluator(context)
        if seconds is not None:
            seconds[evaluator.name] = round(time.perf_counter() - start, 4)
        clash = set(found) & set(metrics)
        if clash:
            raise ValueError(f"evaluator {evaluator.name!r} reports {sorted(clash)} again")
        metrics.update(found)
    metrics["parameters"] = sum(p.numel() for p in context.model.parameters())
    return metrics
