"""Evaluators: accuracy, size and latency, each measured on the model rebuilt from its file."""

from slimsearch.evaluators._base import (
    DEFAULT_EVALUATORS,
    AccuracyEvaluator,
    EvalContext,
    Evaluator,
    LatencyEvaluator,
    SizeEvaluator,
    evaluate,
)
from slimsearch.evaluators.latency import Latency, measure_latency

__all__ = [
    "DEFAULT_EVALUATORS",
    "AccuracyEvaluator",
    "EvalContext",
    "Evaluator",
    "Latency",
    "LatencyEvaluator",
    "SizeEvaluator",
    "evaluate",
    "measure_latency",
]
