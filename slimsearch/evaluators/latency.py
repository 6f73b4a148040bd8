"""Latency of the executable model, measured the way it will be deployed.

CPU: threads fixed (default 1), >= 100 warm-up calls, then >= 500 timed samples, each of a
few calls so that a sample is long enough for the clock; the median per call is the result.
CUDA: CUDA events around each call on an idle queue; warm-up continues until the median of
successive rounds stops moving; optionally the call is replayed as a captured CUDA graph; the
peak memory the device allocated is recorded.

Either way the device is held exclusively (``devices.exclusive``): no other measurement and no
local trial's training runs on it meanwhile. A measurement whose coefficient of variation is
above ``max_cv`` is repeated (up to ``max_repeats`` times) and the steadiest one is kept; it
says how many it took and whether it ever got below the threshold.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from slimsearch.devices import exclusive

#: A CPU sample lasts at least this long (seconds), so timer resolution does not matter.
MIN_SAMPLE_S = 200e-6
MAX_CALLS_PER_SAMPLE = 16
#: CUDA warm-up runs in rounds of this many calls until two successive round medians agree
#: within STABLE_FRACTION (and at least ``warmup`` calls ran), at most MAX_WARMUP_ROUNDS rounds.
WARMUP_ROUND = 20
STABLE_FRACTION = 0.02
MAX_WARMUP_ROUNDS = 50


@dataclass(frozen=True)
class Latency:
    """Per-call latency in milliseconds and how it was measured."""

    median_ms: float
    p90_ms: float
    #: Coefficient of variation of the samples (std / mean, a fraction).
    cv: float
    samples: int
    calls_per_sample: int
    warmup_calls: int
    device: str
    batch_size: int
    threads: int
    #: How many measurements it took to get the spread below the threshold (1 = the first).
    attempts: int = 1
    #: True when even the steadiest attempt stayed above the CV threshold.
    unstable: bool = False
    cuda_graph: bool = False
    #: Most bytes the device had allocated during the measurement (CUDA only; None on CPU,
    #: where no per-model figure exists).
    peak_memory_bytes: int | None = None

    def as_metrics(self, suffix: str = "") -> dict[str, Any]:
        """Flat metric names for a trial: ``latency_ms`` is the objective, the rest extras.
        ``suffix`` (e.g. ``"_b256"``) names the figures of an extra batch size."""
        data = asdict(self)
        return {f"latency{suffix}_ms": data.pop("median_ms"),
                f"latency{suffix}_p90_ms": data.pop("p90_ms"),
                **{f"latency{suffix}_{k}": v for k, v in data.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Latency:
        return cls(**data)


def _summarise(per_call_ms: list[float], *, calls: int, warmup: int, device: torch.device,
               batch_size: int, threads: int) -> Latency:
    ordered = sorted(per_call_ms)
    mean = statistics.fmean(ordered)
    return Latency(median_ms=statistics.median(ordered),
                   p90_ms=ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
                   cv=statistics.pstdev(ordered) / mean if mean > 0 else 0.0,
                   samples=len(ordered), calls_per_sample=calls, warmup_calls=warmup,
                   device=str(device), batch_size=batch_size, threads=threads)


@torch.inference_mode()
def measure_latency(model: Callable[[Any], Any], inputs: Any, *, device: torch.device,
                    threads: int = 1, warmup: int = 100, samples: int = 500,
                    max_cv: float = math.inf, max_repeats: int = 0,
                    cuda_graph: bool = False) -> Latency:
    """Median per-call latency (ms) of ``model(inputs)`` on ``device``; ``inputs`` is one batch
    in the form the model takes (a tensor already on ``device``, or e.g. a numpy array for
    onnxruntime). ``model`` may be an ``nn.Module`` or any callable."""
    if isinstance(model, torch.nn.Module):
        # Moved only when it is not there yet: a runtime may have put tensor subclasses
        # (sparse or quantized weights) on the device that should not be copied again.
        if any(p.device.type != device.type or device.index not in (None, p.device.index)
               for p in model.parameters()):
            model = model.to(device)
        model = model.eval()
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.to(device)
    batch = int(len(inputs))
    previous_threads = torch.get_num_threads()
    with exclusive(device):
        try:
            if device.type == "cuda":
                once = lambda: _measure_cuda(model, inputs, device=device, warmup=warmup,  # noqa: E731
                                             samples=samples, batch=batch, graph=cuda_graph)
            else:
                torch.set_num_threads(threads)
                once = lambda: _measure_cpu(model, inputs, warmup=warmup, samples=samples,  # noqa: E731
                                            batch=batch, threads=threads)
            return _steadiest(once, max_cv=max_cv, max_repeats=max_repeats)
        finally:
            torch.set_num_threads(previous_threads)


def _steadiest(once: Callable[[], Latency], *, max_cv: float, max_repeats: int) -> Latency:
    """Measure until the CV is at most ``max_cv`` (or ``max_repeats`` repeats ran); keep the
    attempt with the smallest CV, since a disturbed measurement is wider, not narrower."""
    attempts = [once()]
    while attempts[-1].cv > max_cv and len(attempts) <= max_repeats:
        attempts.append(once())
    best = min(attempts, key=lambda a: a.cv)
    return replace(best, attempts=len(attempts), unstable=best.cv > max_cv)


def _measure_cpu(model: Callable[[Any], Any], x: Any, *, warmup: int, samples: int, batch: int,
                 threads: int, clock: Callable[[], float] = time.perf_counter) -> Latency:
    for _ in range(warmup):
        model(x)
    start = clock()
    for _ in range(10):
        model(x)
    per_call = (clock() - start) / 10
    calls = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / max(per_call, 1e-9))))
    times = []
    for _ in range(samples):
        start = clock()
        for _ in range(calls):
            model(x)
        times.append((clock() - start) / calls * 1e3)
    return _summarise(times, calls=calls, warmup=warmup + 10, device=torch.device("cpu"),
                      batch_size=batch, threads=threads)


def _capture(model: Callable[[Any], Any], x: torch.Tensor) -> Callable[[Any], Any] | None:
    """``model(x)`` captured as a CUDA graph (replayed on the same static input), or None
    when the model cannot be captured (host synchronisation, dynamic shapes, ...)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # PyTorch's recipe: warm up on a side stream first
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x)
    except Exception:  # noqa: BLE001 - any capture failure means: time it eagerly
        return None
    return lambda _x: graph.replay()


def _measure_cuda(model: Callable[[Any], Any], x: Any, *, device: torch.device, warmup: int,
                  samples: int, batch: int, graph: bool) -> Latency:
    with torch.cuda.device(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        call = _capture(model, x) if graph else None
        captured = call is not None
        call = call or model

        def timed(n: int) -> list[float]:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for start, end in zip(starts, ends, strict=True):
                # An idle queue before each call: the sample then includes the CPU launch
                # overhead that dominates small batches, as a deployed call would.
                torch.cuda.synchronize(device)
                start.record()
                call(x)
                end.record()
            torch.cuda.synchronize(device)
            return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]

        # Warm up until the median settles (clocks ramp up, autotuners and allocators settle).
        warm, previous = 0, math.inf
        for _ in range(MAX_WARMUP_ROUNDS):
            median = statistics.median(timed(WARMUP_ROUND))
            warm += WARMUP_ROUND
            if warm >= warmup and abs(median - previous) <= STABLE_FRACTION * previous:
                break
            previous = median
        result = _summarise(timed(samples), calls=1, warmup=warm, device=device,
                            batch_size=batch, threads=torch.get_num_threads())
        peak = int(torch.cuda.max_memory_allocated(device))
    return replace(result, cuda_graph=captured, peak_memory_bytes=peak)
