"""Timing primitives: the latency protocol (warm-up, samples in windows between readings of a
reference workload, CUDA events) and the machine probe. Runtimes time candidate kernels with
them and evaluators time whole models; neither owns them."""

from slimsearch.timing.latency import Latency, measure_latency

__all__ = ["Latency", "measure_latency"]
