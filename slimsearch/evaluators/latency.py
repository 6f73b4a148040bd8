"""Latency of the executable model, measured the way it will be deployed.

CPU: torch threads fixed (default 1), >= 100 warm-up calls, then >= 500 timed samples, each of
a few calls so that a sample is long enough for the clock; the median per call is the result.
CUDA: the same, timed with CUDA events after synchronising. Either way the device is held
exclusively (``devices.exclusive``) so no two measurements overlap, and the spread is kept.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from slimsearch.devices import exclusive

#: A CPU sample lasts at least this long (seconds), so timer resolution does not matter.
MIN_SAMPLE_S = 200e-6
MAX_CALLS_PER_SAMPLE = 16


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

    def as_metrics(self) -> dict[str, float | int | str]:
        """Flat metric names for a trial: ``latency_ms`` is the objective, the rest extras."""
        data = asdict(self)
        return {"latency_ms": data.pop("median_ms"), "latency_p90_ms": data.pop("p90_ms"),
                **{f"latency_{k}": v for k, v in data.items()}}


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
def measure_latency(model: nn.Module, inputs: torch.Tensor, *, device: torch.device,
                    threads: int = 1, warmup: int = 100, samples: int = 500) -> Latency:
    """Median per-call latency (ms) of ``model(inputs)`` on ``device``; ``inputs`` is one batch."""
    model = model.to(device).eval()
    x = inputs.to(device)
    batch = int(x.shape[0])
    previous_threads = torch.get_num_threads()
    with exclusive(device):
        try:
            if device.type == "cuda":
                return _measure_cuda(model, x, device=device, warmup=warmup, samples=samples,
                                     batch=batch)
            torch.set_num_threads(threads)
            return _measure_cpu(model, x, warmup=warmup, samples=samples, batch=batch,
                                threads=threads)
        finally:
            torch.set_num_threads(previous_threads)


def _measure_cpu(model: nn.Module, x: torch.Tensor, *, warmup: int, samples: int, batch: int,
                 threads: int) -> Latency:
    for _ in range(warmup):
        model(x)
    start = time.perf_counter()
    for _ in range(10):
        model(x)
    per_call = (time.perf_counter() - start) / 10
    calls = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / max(per_call, 1e-9))))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(calls):
            model(x)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return _summarise(times, calls=calls, warmup=warmup + 10, device=torch.device("cpu"),
                      batch_size=batch, threads=threads)


def _measure_cuda(model: nn.Module, x: torch.Tensor, *, device: torch.device, warmup: int,
                  samples: int, batch: int) -> Latency:
    with torch.cuda.device(device):
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
        for start, end in zip(starts, ends, strict=True):
            # An idle queue before each call: the sample then includes the CPU launch overhead
            # that dominates small batches, as a deployed call would.
            torch.cuda.synchronize(device)
            start.record()
            model(x)
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    return _summarise(times, calls=1, warmup=warmup, device=device, batch_size=batch,
                      threads=torch.get_num_threads())
