"""Latency of the executable model, measured the way it will be deployed.

CPU: threads fixed (default 1), >= 100 warm-up calls (and >= 10 ms), then >= 500 timed
samples, each of a few calls so that a sample is long enough for the clock, taken in 5 ms
windows between readings of a reference workload (``machine_probe``). A window is
undisturbed when the probe read near its floor on both sides and the window's own median is
near the fastest such window's. The median per call of the samples of undisturbed windows is
the result, once 500 came, or once ``quiet_wait_s`` passed with at least 100 of them; with
fewer, the samples of disturbed windows are scaled by the machine's measured slowdown and
counted too, and the result says so (``disturbed``).
CUDA: CUDA events around each call on an idle queue; warm-up continues until the median of
successive rounds stops moving; optionally the call is replayed as a captured CUDA graph; the
peak memory the device allocated is recorded.

Either way the device is held exclusively (``devices.exclusive``): no other measurement and no
local trial's training runs on it meanwhile. A measurement whose coefficient of variation is
above ``max_cv`` is repeated (up to ``max_repeats`` times) and the steadiest one is kept; it
says how many it took and whether it ever got below the threshold.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from slimsearch.devices import exclusive
from slimsearch.timing.machine_probe import MachineProbe, kind_for

#: A CPU sample lasts at least this long (seconds), so timer resolution and the timer's own
#: cost (~0.1 us) do not matter. (50 us gave digits-mlp's 31 us calls two per sample: the same
#: median within 0.3%, at 1.5x the time per measurement.)
MIN_SAMPLE_S = 25e-6
MAX_CALLS_PER_SAMPLE = 16
#: CPU warm-up lasts at least this long (seconds) as well as ``warmup`` calls.
WARMUP_MIN_S = 0.01
#: CPU samples are taken in windows of this many seconds between two probe readings.
WINDOW_S = 0.005
#: An undisturbed window's median is at most this fraction above the fastest undisturbed
#: window's: some disturbances slow a model without slowing the probe (seen on the CNN).
WINDOW_TOLERANCE = 0.05
#: ... or three standard errors of a window's median, when that is wider: a slow model's
#: 5 ms window holds a few samples whose median is noisy, and keeping only the windows near
#: the fastest of many noisy medians would bias the result low.
WINDOW_STANDARD_ERRORS = 3.0
#: When the wait for undisturbed moments ran out, this many undisturbed samples still make
#: the measurement (fewer than asked for, but unscaled: scaling by the probe's slowdown was
#: 5-18% off the model's own on the reference VM); with fewer, the disturbed windows are
#: scaled instead.
MIN_UNDISTURBED = 100
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
    #: Coefficient of variation of the samples (std / mean, a fraction): their spread.
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
    #: CPU: fraction of the samples taken while the machine was undisturbed (see
    #: ``machine_probe``), the machine's slowdown during the measurement (1.0 = undisturbed),
    #: whether too few undisturbed samples came and the result was scaled by that slowdown
    #: instead, and the plain median of every sample, whatever the machine was doing.
    quiet_fraction: float | None = None
    slowdown: float | None = None
    disturbed: bool = False
    raw_median_ms: float | None = None
    #: CPU: the machine probe's kind (``linear`` or ``conv``: the workload whose slowdown
    #: judges and scales the windows).
    probe: str | None = None
    #: Coefficient of variation of the medians of successive windows (CPU: the 5 ms windows
    #: used; CUDA: blocks of 50 samples): how steady the median was over the measurement.
    #: Above ``max_cv`` the measurement is repeated. (Single samples of a few microseconds
    #: jitter by 10-30% on any machine, so their own CV would repeat every measurement.)
    window_cv: float = 0.0
    #: CPU, timed against the run's reference (``timing.paired``): the median ratio of this
    #: model's time to the reference's in the same moments, its ~95% interval, the rounds it
    #: took, the reference's median in those moments and its latency at the start of the run
    #: (``anchor_ms``; ``median_ms`` = ``ratio`` x ``anchor_ms``). None when timed alone.
    ratio: float | None = None
    ratio_low: float | None = None
    ratio_high: float | None = None
    rounds: int | None = None
    reference_ms: float | None = None
    anchor_ms: float | None = None

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
    return Latency(median_ms=statistics.median(ordered),
                   p90_ms=ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
                   cv=_cv(ordered),
                   samples=len(ordered), calls_per_sample=calls, warmup_calls=warmup,
                   device=str(device), batch_size=batch_size, threads=threads)


@torch.inference_mode()
def measure_latency(model: Callable[[Any], Any], inputs: Any, *, device: torch.device,
                    threads: int = 1, warmup: int = 100, samples: int = 500,
                    max_cv: float = math.inf, max_repeats: int = 0,
                    cuda_graph: bool = False, quiet_wait_s: float = 0.0,
                    warmup_s: float = WARMUP_MIN_S, probe: str | None = None) -> Latency:
    """Median per-call latency (ms) of ``model(inputs)`` on ``device``; ``inputs`` is one batch
    in the form the model takes (a tensor already on ``device``, or e.g. a numpy array for
    onnxruntime). ``model`` may be an ``nn.Module`` or any callable. ``probe``: the machine
    probe's kind on CPU (default: ``machine_probe.kind_for(model)``; pass it for a callable
    that wraps a module, e.g. an onnxruntime session)."""
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
                # A repeat follows the first attempt at once: the model and the core are warm,
                # so only the first waits out warmup_s (the warm-up calls still run each time).
                attempt = itertools.count()
                machine = MachineProbe(threads, kind=probe or kind_for(model))
                once = lambda: _measure_cpu(model, inputs, warmup=warmup, samples=samples,  # noqa: E731
                                            batch=batch, threads=threads,
                                            quiet_wait_s=quiet_wait_s,
                                            warmup_s=warmup_s if next(attempt) == 0 else 0.0,
                                            probe=machine)
            return _steadiest(once, max_cv=max_cv, max_repeats=max_repeats)
        finally:
            torch.set_num_threads(previous_threads)


@torch.inference_mode()
def compare_latency(forms: dict[str, Callable[[Any], Any]], inputs: Any, *, threads: int = 1,
                    rounds: int = 10, window_s: float = 0.0015,
                    warmup_s: float = 0.005) -> dict[str, float]:
    """Median milliseconds per call of each of ``forms`` on ``inputs`` (CPU), for choosing
    between them: they are timed in turns, a short window each per round with the order
    rotating, and each is reported as the first one's median times its median ratio to the
    first within a round. Both sides of every ratio saw the same machine moments, so a
    machine that slows down 1.5x for a second does not decide the choice."""
    names = list(forms)
    previous_threads = torch.get_num_threads()
    with exclusive(torch.device("cpu")):
        try:
            torch.set_num_threads(threads)
            for fn in forms.values():
                start = time.perf_counter()
                while time.perf_counter() - start < warmup_s:
                    fn(inputs)
            per_round: list[dict[str, float]] = []
            for r in range(rounds):
                medians = {}
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times, start = [], time.perf_counter()
                    while not times or time.perf_counter() - start < window_s:
                        sample_start = time.perf_counter()
                        forms[name](inputs)
                        times.append((time.perf_counter() - sample_start) * 1e3)
                    medians[name] = statistics.median(times)
                per_round.append(medians)
        finally:
            torch.set_num_threads(previous_threads)
    base = names[0]
    base_ms = statistics.median(m[base] for m in per_round)
    return {name: base_ms * statistics.median(m[name] / m[base] for m in per_round)
            for name in names}


def _steadiest(once: Callable[[], Latency], *, max_cv: float, max_repeats: int) -> Latency:
    """Measure until an attempt is undisturbed with a window CV of at most ``max_cv`` (or
    ``max_repeats`` repeats ran); keep the steadiest undisturbed attempt, or the steadiest of
    all when none was. A disturbed attempt (too few undisturbed samples, so the rest were
    scaled by the probe's slowdown: 15-20% off on the CNN) is repeated too: on the reference
    VM disturbances come and go within a second, and a repeat is often undisturbed."""
    def settled(attempt: Latency) -> bool:
        return not attempt.disturbed and attempt.window_cv <= max_cv

    attempts = [once()]
    while not settled(attempts[-1]) and len(attempts) <= max_repeats:
        attempts.append(once())
    undisturbed = [a for a in attempts if not a.disturbed]
    best = min(undisturbed or attempts, key=lambda a: a.window_cv)
    return replace(best, attempts=len(attempts), unstable=best.window_cv > max_cv)


def _cv(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = statistics.fmean(values)
    return statistics.pstdev(values) / mean if mean > 0 else 0.0


@dataclass
class _Window:
    """Samples (ms per call) taken between two probe readings (us)."""

    before_us: float
    times_ms: list[float]
    after_us: float
    median_ms: float = field(init=False)

    def __post_init__(self) -> None:
        self.median_ms = statistics.median(self.times_ms)


def _undisturbed(windows: list[_Window], probe: MachineProbe) -> list[bool]:
    """Which windows saw an undisturbed machine: the probe read near its floor before and
    after, and the window's own median is near the fastest such windows' (a disturbance only
    ever slows a window down, and not every one slows the probe as much as the model).

    "The fastest" is the 10th percentile of the window medians, and "near" is within 5% or
    three standard errors of a window's median, whichever is wider: a slow model's 5 ms window
    holds a few samples whose median is noisy, and keeping only the windows near the single
    fastest of many noisy medians would bias the result low."""
    probe_quiet = [probe.is_quiet(w.before_us) and probe.is_quiet(w.after_us) for w in windows]
    quiet_windows = [w for w, quiet in zip(windows, probe_quiet, strict=True) if quiet]
    if not quiet_windows:
        return probe_quiet
    medians = sorted(w.median_ms for w in quiet_windows)
    fastest = medians[int(0.1 * (len(medians) - 1))]
    tolerance = max(WINDOW_TOLERANCE, WINDOW_STANDARD_ERRORS * _median_standard_error(quiet_windows))
    return [quiet and w.median_ms <= fastest * (1 + tolerance)
            for w, quiet in zip(windows, probe_quiet, strict=True)]


def _median_standard_error(windows: list[_Window]) -> float:
    """Standard error of a window's median, relative to it: the spread of samples inside a
    window times 1.25 / sqrt(samples per window), the standard error of a median. The spread
    comes from differences between successive samples (their median is 0.954 standard
    deviations for normal noise), pooled over the windows: unbiased for windows of 3 samples
    as of 300, robust to the odd slow call, and not inflated by a disturbance that slows
    whole windows."""
    per_window = statistics.median(len(w.times_ms) for w in windows)
    if per_window >= 3:
        steps = [abs(a - b) / w.median_ms for w in windows if w.median_ms > 0
                 for a, b in itertools.pairwise(w.times_ms)]
    else:  # a model slower than a window holds one or two samples: successive ones across
        # windows (probe-quiet ones, in time order), their spread alike
        times = [t for w in windows for t in w.times_ms]
        middle = statistics.median(times)
        steps = [abs(a - b) / middle for a, b in itertools.pairwise(times)] if middle > 0 else []
    if not steps:
        return 0.0
    return 1.25 * statistics.median(steps) / 0.954 / math.sqrt(per_window)


def _chosen_samples(windows: list[_Window], probe: MachineProbe,
                    samples: int) -> tuple[list[list[float]], int, bool]:
    """The samples (ms per call) that make the measurement, by window; how many samples were
    undisturbed; and whether too few were, so that the rest were scaled.

    Enough undisturbed samples (all that were asked for, or at least MIN_UNDISTURBED when the
    wait ran out): they alone are the measurement. Otherwise every window counts, and those
    taken while the machine was disturbed are scaled by floor / reading, which is only as good
    as the probe's slowdown matches the model's (within 5-18% measured)."""
    undisturbed = _undisturbed(windows, probe)
    quiet = sum(len(w.times_ms) for w, q in zip(windows, undisturbed, strict=True) if q)
    disturbed = quiet < min(samples, MIN_UNDISTURBED)
    chosen = [w.times_ms if q else [t * probe.floor_us / ((w.before_us + w.after_us) / 2)
                                    for t in w.times_ms]
              for w, q in zip(windows, undisturbed, strict=True) if disturbed or q]
    return chosen, quiet, disturbed


def _measure_cpu(model: Callable[[Any], Any], x: Any, *, warmup: int, samples: int, batch: int,
                 threads: int, quiet_wait_s: float = 0.0, warmup_s: float = WARMUP_MIN_S,
                 clock: Callable[[], float] = time.perf_counter,
                 probe: MachineProbe | None = None) -> Latency:
    """Windows of samples between probe readings, until ``samples`` samples were taken in
    undisturbed windows (both readings near the floor) or, after ``quiet_wait_s`` seconds,
    with whatever the windows hold: then the samples of disturbed windows are scaled by
    floor / reading (the machine's slowdown at that moment; a pure-Python loop, a matmul and
    these models all slowed by 1.45-1.6x together on the reference VM) and the result is
    flagged ``disturbed``."""
    probe = probe or MachineProbe(threads, clock=clock)
    start = clock()
    calls_done = 0
    while calls_done < warmup or clock() - start < warmup_s:  # also: a core waking up
        model(x)
        calls_done += 1
    start = clock()
    for _ in range(10):
        model(x)
    per_call = (clock() - start) / 10
    calls = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / max(per_call, 1e-9))))
    windows: list[_Window] = []
    total = 0
    before = probe.burst()
    begin = clock()
    while True:
        window_start, times = clock(), []
        while not times or clock() - window_start < WINDOW_S:
            sample_start = clock()
            for _ in range(calls):
                model(x)
            times.append((clock() - sample_start) / calls * 1e3)
        after = probe.burst()
        windows.append(_Window(before, times, after))
        before, total = after, total + len(times)
        if sum(len(w.times_ms) for w, quiet in zip(windows, _undisturbed(windows, probe),
                                                    strict=True) if quiet) >= samples:
            break
        if total >= samples and clock() - begin >= quiet_wait_s:
            break
    probe.save()
    chosen_windows, quiet, disturbed = _chosen_samples(windows, probe, samples)
    chosen = [t for times in chosen_windows for t in times]
    every = [t for w in windows for t in w.times_ms]
    readings = [windows[0].before_us, *(w.after_us for w in windows)]
    result = _summarise(chosen, calls=calls, warmup=calls_done + 10, device=torch.device("cpu"),
                        batch_size=batch, threads=threads)
    return replace(result, disturbed=disturbed, probe=probe.kind,
                   quiet_fraction=round(quiet / len(every), 4),
                   slowdown=round(statistics.median(readings) / probe.floor_us, 4),
                   raw_median_ms=statistics.median(every),
                   window_cv=_cv([statistics.median(t) for t in chosen_windows if t]))


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
        times = timed(samples)
        result = _summarise(times, calls=1, warmup=warm, device=device, batch_size=batch,
                            threads=torch.get_num_threads())
        peak = int(torch.cuda.max_memory_allocated(device))
    blocks = [statistics.median(times[i:i + 50]) for i in range(0, len(times) - 49, 50)]
    return replace(result, cuda_graph=captured, peak_memory_bytes=peak, window_cv=_cv(blocks))
