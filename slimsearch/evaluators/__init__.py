"""Evaluators: accuracy, size and latency, each measured on the executable form of the model."""

from slimsearch.evaluators._base import (
    DEFAULT_EVALUATORS,
    REPORTED_PRECISION,
    AccuracyEvaluator,
    EvalContext,
    Evaluator,
    LatencyEvaluator,
    Reference,
    SizeEvaluator,
    chance_score,
    evaluate,
    metric_suffix,
    reference_at_rest,
    reference_from_metrics,
    untrained_teacher,
)
from slimsearch.evaluators.latency_cache import LatencyCache
from slimsearch.timing.latency import Latency, measure_latency

__all__ = [
    "DEFAULT_EVALUATORS",
    "REPORTED_PRECISION",
    "AccuracyEvaluator",
    "EvalContext",
    "Evaluator",
    "Latency",
    "LatencyCache",
    "LatencyEvaluator",
    "Reference",
    "SizeEvaluator",
    "evaluate",
    "chance_score",
    "measure_latency",
    "metric_suffix",
    "reference_at_rest",
    "reference_from_metrics",
    "untrained_teacher",
]
