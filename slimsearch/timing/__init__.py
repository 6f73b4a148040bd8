"""Timing primitives: a model timed against a reference in the same moments (``paired``), a
model timed alone (``latency``: at rest on the CPU, CUDA events), and forms compared in turns.
Runtimes time candidate kernels with them and evaluators time whole models; neither owns
them."""

from slimsearch.timing.latency import Latency, measure_latency

__all__ = ["Latency", "measure_latency"]
