"""Evaluators: each measures the executable form of a model, as its runtime runs it.

An evaluator is any object with a ``name`` and ``__call__(context) -> dict[str, metric]``.
``evaluate`` runs a sequence of them and merges their metrics; a name clash is a bug.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from slimsearch.evaluators.latency_cache import LatencyCache
from slimsearch.experiment import TargetConfig
from slimsearch.runtimes import Executable
from slimsearch.tasks import Data, Task
from slimsearch.tasks import metrics as scoring
from slimsearch.timing.latency import Latency, measure_latency, rested_latency
from slimsearch.timing.paired import paired_latency
from slimsearch.training import full_fp32

Metric = float | int | str

#: The target's other batch sizes are reported, not searched on: their ratio is timed to this
#: fraction (each side of its ~95% interval; the objective's is ``paired.PRECISION``) and
#: trusted within it, and only for the front (``confirm``), not for every trial. At batch 1 a
#: digits-cnn student's per-round ratio swung by +-15% on the reference VM, and reaching 5%
#: took a median 43 rounds: a twentieth of every trial, for a figure that decides nothing.
REPORTED_PRECISION = 0.10


def metric_suffix(position: int, batch: int) -> str:
    """How the figures of the target's ``position``-th batch size are named: ``latency_ms``
    for the first (the objective), ``latency_b<batch>_ms`` for the others."""
    return "" if position == 0 else f"_b{batch}"


@dataclass(frozen=True)
class Reference:
    """What a model's CPU latency is timed against (``timing.paired``): the run's teacher in
    the same runtime. By target batch size: the batch the teacher runs at beside the model
    (``batch``: the same one, or a slice of it when the teacher's call at the target batch is
    long, see ``reference_batch``) and its latency there at rest (``anchor_ms``, ms per call,
    measured at the start of the run: the figure every ratio is multiplied by)."""

    executable: Executable
    anchor_ms: dict[int, float]
    batch: dict[int, int]

    def inputs(self, task: Task, batch: int) -> object:
        """The reference's input beside a model timed at ``batch``."""
        return self.executable.native(task.example_inputs(self.batch[batch]))


#: The reference's call beside a model should take at most about this long (ms): at the
#: digits-cnn teacher's 55 ms per call at batch 256, the teacher's side took 4/5 of every
#: round, and of every trial's measuring time. Disturbances hit a slice of the same model on
#: the same core alike; the slice only has to last longer than the disturbance is short.
REFERENCE_CALL_MS = 5.0


def reference_batch(executable: Executable, task: Task, batch: int, *, threads: int) -> int:
    """The batch the reference runs at beside models timed at ``batch``: ``batch`` halved
    until one call of it takes at most REFERENCE_CALL_MS (a choice, recorded with the
    teacher's figures and reused by the run's every measurement; not a figure)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            while batch > 1:
                x = executable.native(task.example_inputs(batch))
                executable.run(x)  # warm
                start = time.perf_counter()
                executable.run(x)
                if (time.perf_counter() - start) * 1e3 <= REFERENCE_CALL_MS:
                    break
                batch //= 2
    finally:
        torch.set_num_threads(previous)
    return batch


def teacher_at_rest(executable: Executable, task: Task, batch: int, *,
                    threads: int) -> tuple[int, Latency]:
    """The reference batch for ``batch`` and the teacher's latency there at rest (its
    anchor; ``timing.rested_latency``)."""
    at = reference_batch(executable, task, batch, threads=threads)
    rested = rested_latency(executable.run, executable.native(task.example_inputs(at)),
                            threads=threads)
    return at, replace(rested, reference_batch=at)


def reference_at_rest(executable: Executable, task: Task, target: TargetConfig) -> Reference:
    """``executable`` as the reference, with its anchors measured now for each of the
    target's batch sizes (CPU)."""
    found = {b: teacher_at_rest(executable, task, b, threads=target.threads)
             for b in target.batch_sizes}
    return Reference(executable, anchor_ms={b: r.median_ms for b, (_, r) in found.items()},
                     batch={b: at for b, (at, _) in found.items()})


def reference_from_metrics(executable: Executable, teacher: dict[str, Metric],
                           batch_sizes: Sequence[int]) -> Reference:
    """``executable`` (the teacher) as the reference, with the anchors its measurement at the
    start of the run recorded in ``teacher`` (its metrics); batch sizes it has none for are
    left out (their figures are timed alone)."""
    anchors, batches = {}, {}
    for position, batch in enumerate(batch_sizes):
        suffix = metric_suffix(position, batch)
        anchor = teacher.get(f"latency{suffix}_anchor_ms") or teacher.get(f"latency{suffix}_ms")
        if anchor:
            anchors[batch] = float(anchor)
            batches[batch] = int(teacher.get(f"latency{suffix}_reference_batch") or batch)
    return Reference(executable, anchor_ms=anchors, batch=batches)


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
    #: Which of the target's batch sizes to time; None: all of them. A search times a trial
    #: at the objective's only: the others are reported for the front, and the confirmation
    #: pass times them there (``confirm``).
    batch_sizes: tuple[int, ...] | None = None

    @property
    def artifact(self) -> Path:
        return self.executable.artifact


class Evaluator(Protocol):
    """Measures one aspect of the executable model; returns named metrics with units in the name."""

    name: str

    def __call__(self, context: EvalContext) -> dict[str, Metric]: ...


@dataclass(frozen=True)
class AccuracyEvaluator:
    """The task's metrics on the ``val`` or ``test`` split (``tasks.metrics``): the first's
    score as ``<split>_accuracy`` (the search's accuracy objective, whatever the metric: top-1
    accuracy as a fraction by default), every one's as ``<split>_score_<name>``, the split's size,
    and (``val``) the objective's name as ``metric``."""

    split: str = "val"

    @property
    def name(self) -> str:
        return f"{self.split}_accuracy"

    def __call__(self, context: EvalContext) -> dict[str, Metric]:
        task = context.task
        with full_fp32():  # TF32 would let one file classify a borderline sample two ways
            outputs, targets = context.executable.predict(task.data(self.split))
        found: dict[str, Metric] = {f"{self.split}_score_{m.label}": m.score(outputs, targets)
                                    for m in task.scores}
        named = ({"metric": task.metric.label, "metric_fraction": task.metric.fraction}
                 if self.split == "val" else {})  # said once per record
        return {**found, **named, self.name: found[f"{self.split}_score_{task.metric.label}"],
                f"{self.split}_samples": len(targets)}


#: A teacher whose validation score is no more than this above guessing (a fraction of the
#: guess's score, at least 0.01) has learned nothing worth compressing.
CHANCE_MARGIN = 0.01


def chance_score(data: Data, metric: scoring.Metric) -> float:
    """``metric``'s score on ``data`` of always giving one answer: its most common class (a
    classification), or its targets' mean (a regression)."""
    targets = data.targets()
    if metric.kind == "regression":
        guess = targets.double().mean(0, keepdim=True).expand(targets.shape)
        outputs = guess if targets.dim() > 1 else guess[:, None]
    else:
        classes = int(targets.max()) + 1
        outputs = torch.zeros(len(targets), max(classes, 2), dtype=torch.float64)
        outputs[:, int(torch.bincount(targets).argmax())] = 1.0
    return metric.score(outputs.float(), targets)


def untrained_teacher(teacher: dict[str, Metric]) -> str | None:
    """A warning when the teacher's metrics (with ``val_majority_accuracy``, the score of a
    constant answer, ``chance_score``) show it no better than guessing; None otherwise."""
    chance, found = teacher.get("val_majority_accuracy"), teacher.get("val_accuracy")
    if not isinstance(chance, float) or not isinstance(found, float):
        return None
    if found > chance + max(CHANCE_MARGIN, CHANCE_MARGIN * abs(chance)):
        return None
    name = teacher.get("metric", "accuracy")
    known = scoring.BUILT_IN.get(name)
    guess = ("the mean of the targets" if known is not None and known.kind == "regression"
             else "the most common class")
    return (f"the teacher's validation {name} {found:.4f} is no better than always predicting "
            f"{guess} ({chance:.4f}): it learned nothing, and every trial is compared with it")


@dataclass(frozen=True)
class SizeEvaluator:
    """``size_bytes``: the byte length of the deployable file, nothing estimated."""

    name: str = "size_bytes"

    def __call__(self, context: EvalContext) -> dict[str, Metric]:
        return {"size_bytes": context.artifact.stat().st_size}


@dataclass(frozen=True)
class LatencyEvaluator:
    """``latency_ms`` (median per call), its spread, p90, samples and peak memory at the
    target's first batch size; the same as ``latency_b<N>_*`` for its other batch sizes
    (those of ``context.batch_sizes``: all unless it says otherwise).

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
        timed = context.batch_sizes or target.batch_sizes
        metrics: dict[str, Metric] = {}
        for position, batch in enumerate(target.batch_sizes):
            if batch not in timed:
                continue
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
                result = self._measure(context, batch, objective=position == 0)
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
        anchor, or alone (a figure at rest is its own anchor)."""
        anchor = cls._anchor(context, batch)
        if anchor is None:
            return cached.anchor_ms in (None, cached.median_ms)
        return cached.anchor_ms == anchor

    def _measure(self, context: EvalContext, batch: int, *, objective: bool = True) -> Latency:
        target, executable, task = context.target, context.executable, context.task
        inputs = executable.native(task.example_inputs(batch))
        if (anchor := self._anchor(context, batch)) is not None:
            reference = context.reference
            looser = {} if objective else {"precision": REPORTED_PRECISION,
                                           "trusted": REPORTED_PRECISION}
            return paired_latency(executable.run, inputs, reference.executable.run,
                                  reference.inputs(task, batch), anchor_ms=anchor,
                                  batch_size=batch, threads=target.threads,
                                  reference_batch=reference.batch[batch], **looser)
        if context.is_reference and context.device.type == "cpu":
            at, rested = teacher_at_rest(executable, task, batch, threads=target.threads)
            if at == batch:
                return rested
            # timed against a slice of itself, like every trial: the same footing
            return paired_latency(executable.run, inputs, executable.run,
                                  executable.native(task.example_inputs(at)),
                                  anchor_ms=rested.median_ms, batch_size=batch,
                                  threads=target.threads, reference_batch=at)
        return measure_latency(executable.run, inputs, device=context.device,
                               threads=target.threads, warmup=self.warmup,
                               samples=self.samples, max_cv=target.max_cv,
                               max_repeats=target.max_repeats, cuda_graph=target.cuda_graphs)


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
