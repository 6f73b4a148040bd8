"""A model timed alone, the way it will be deployed, and forms compared in turns.

CPU (``rested_latency``): the model's latency at rest, as near as the moment allows: a few
bursts of samples, a fraction of a second apart, and the fastest burst's median. A disturbance
only ever slows a model down, so the fastest burst is the least disturbed; nothing is scaled.
This is the anchor a run's every ratio is multiplied by (``timing.paired`` times every other
model against it, in the same moments).
CUDA (``measure_latency``): CUDA events around each call on an idle queue; warm-up continues
until the median of successive rounds stops moving; optionally the call is replayed as a
captured CUDA graph; the peak memory the device allocated is recorded. A measurement whose
spread is above ``max_cv`` is repeated (up to ``max_repeats`` times) and the steadiest kept.
``compare_latency`` times forms of one model in turns, to choose between them.

The device is held exclusively meanwhile (``devices.exclusive``): no other measurement and no
local trial's training runs on it, and Python's garbage collector waits.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from slimsearch.devices import exclusive, wait_apart

#: A CPU sample lasts at least this long (seconds), so timer resolution and the timer's own
#: cost (~0.1 us) do not matter. (50 us gave digits-mlp's 31 us calls two per sample: the same
#: median within 0.3%, at 1.5x the time per measurement.)
MIN_SAMPLE_S = 25e-6
MAX_CALLS_PER_SAMPLE = 16
#: CPU warm-up: at least this long (seconds) and this many calls (the first call of a new
#: shape builds its kernels; a 55 ms call needs no ten more)...
WARMUP_S = 0.02
WARMUP_CALLS = 1
#: ... and then on while it still speeds up by more than SETTLED from one group of calls to
#: the next (each at least one call and WARMUP_GROUP_S seconds, so that a group of fast calls
#: is not mostly clock noise), for at most WARMUP_MAX_S seconds. With the allocator pinned,
#: nine digits-cnn trials' executables at batch 256 (5-28 ms a call) ran at their steady speed
#: from the second call on (within 2-4%; the first: 1.1-2x slower): groups of three calls, as
#: before the pin, spent 9 calls (0.25 s of a 28 ms model) where 3 show it.
SETTLED = 0.02
WARMUP_GROUP_S = 0.005
WARMUP_MAX_S = 0.5
#: At rest: this many bursts, this many seconds apart, each of at least BURST_S seconds and
#: BURST_SAMPLES samples; the fastest burst's median is the figure. The reference VM ran the
#: same model 1.6x slower for several seconds at a time with nothing else running, so the
#: bursts span a few seconds (~3 s: the anchor is measured once per run and once per export,
#: and a slow anchor only makes every trial of the run read slower alike).
REST_BURSTS = 6
REST_PAUSE_S = 0.5
BURST_S = 0.1
BURST_SAMPLES = 20
#: glibc's malloc maps a large buffer fresh (and faults it in) or serves it from its heap,
#: and trims the heap, by rules that depend on what was freed before: the digits-cnn teacher
#: at batch 256 (a 16.8 MB activation) ran at 44 or at 60 ms by that state, from one process
#: to the next and within one. A measuring process pins it (``pin_allocator``): buffers up to
#: 32 MB (the most glibc's manual allows for this setting on 64-bit) come from the heap,
#: which keeps 64 MB before trimming.
#: That is the steady state of a long-running server, and the figure no longer depends on
#: what ran before: 46-49 ms in every process.
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 64 * 2**20
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
    #: CPU: how much slower than at rest the machine ran meanwhile (timed against a
    #: reference: the reference's median in those moments / its latency at rest; at rest:
    #: the slowest burst's median / the fastest's), and the plain median of every sample,
    #: whatever the machine was doing.
    slowdown: float | None = None
    raw_median_ms: float | None = None
    #: How steady the figure was: CUDA, the coefficient of variation of the medians of blocks
    #: of 50 samples (above ``max_cv`` the measurement is repeated); CPU at rest, that of the
    #: bursts' medians; CPU against a reference, the ratio's interval's half-width (a
    #: fraction of it). (Single samples of a few microseconds jitter by 10-30% on any
    #: machine, so their own CV says little.)
    window_cv: float = 0.0
    #: CPU, timed against the run's reference (``timing.paired``): the median ratio of this
    #: model's time to the reference's in the same moments, its ~95% interval, the rounds it
    #: took, the reference's median in those moments and its latency at the start of the run
    #: (``anchor_ms``; ``median_ms`` = ``ratio`` x ``anchor_ms``), and the batch size the
    #: reference ran at (a slice of this one when its call at this one is long). None when
    #: timed alone.
    ratio: float | None = None
    ratio_low: float | None = None
    ratio_high: float | None = None
    rounds: int | None = None
    reference_ms: float | None = None
    anchor_ms: float | None = None
    reference_batch: int | None = None

    def as_metrics(self, suffix: str = "") -> dict[str, Any]:
        """Flat metric names for a trial: ``latency_ms`` is the objective, the rest extras.
        ``suffix`` (e.g. ``"_b256"``) names the figures of an extra batch size."""
        data = asdict(self)
        return {f"latency{suffix}_ms": data.pop("median_ms"),
                f"latency{suffix}_p90_ms": data.pop("p90_ms"),
                **{f"latency{suffix}_{k}": v for k, v in data.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Latency:
        """A recorded figure; fields it no longer has (``disturbed``, ``quiet_fraction`` and
        ``probe``, of the machine-probe protocol that came before the ratio) are left out."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _summarise(per_call_ms: list[float], *, calls: int, warmup: int, device: torch.device,
               batch_size: int, threads: int) -> Latency:
    ordered = sorted(per_call_ms)
    return Latency(median_ms=statistics.median(ordered), p90_ms=p90(ordered),
                   cv=spread(ordered),
                   samples=len(ordered), calls_per_sample=calls, warmup_calls=warmup,
                   device=str(device), batch_size=batch_size, threads=threads)


@functools.cache
def pin_allocator() -> str:
    """Pin glibc's malloc thresholds in this process (see MMAP_THRESHOLD_BYTES), once; what
    the process allocates with, as the latency record says it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        pinned = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its own allocator, as is
        return "the system's allocator"
    if not pinned:
        return "glibc, default thresholds (mallopt refused)"
    return (f"glibc, mmap threshold {MMAP_THRESHOLD_BYTES // 2**20} MB, trim threshold "
            f"{TRIM_THRESHOLD_BYTES // 2**20} MB")


#: mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@torch.inference_mode()
def measure_latency(model: Callable[[Any], Any], inputs: Any, *, device: torch.device,
                    threads: int = 1, warmup: int = 100, samples: int = 500,
                    max_cv: float = math.inf, max_repeats: int = 0,
                    cuda_graph: bool = False) -> Latency:
    """Median per-call latency (ms) of ``model(inputs)`` on ``device``, timed alone; ``inputs``
    is one batch in the form the model takes (a tensor already on ``device``, or e.g. a numpy
    array for onnxruntime). ``model`` may be an ``nn.Module`` or any callable. On the CPU, its
    latency at rest (``rested_latency``; ``warmup``, ``samples``, ``max_cv`` and
    ``max_repeats`` are CUDA's)."""
    if isinstance(model, torch.nn.Module):
        # Moved only when it is not there yet: a runtime may have put tensor subclasses
        # (sparse or quantized weights) on the device that should not be copied again.
        if any(p.device.type != device.type or device.index not in (None, p.device.index)
               for p in model.parameters()):
            model = model.to(device)
        model = model.eval()
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.to(device)
    if device.type != "cuda":
        return rested_latency(model, inputs, threads=threads)
    batch = samples_in(inputs)
    with exclusive(device), steady_process():
        once = lambda: _measure_cuda(model, inputs, device=device, warmup=warmup,  # noqa: E731
                                     samples=samples, batch=batch, graph=cuda_graph)
        return _steadiest(once, max_cv=max_cv, max_repeats=max_repeats)


def samples_in(inputs: Any) -> int:
    """The batch size of a model's input in any runtime's form: an array or tensor, or a
    tuple, list or dict of them (the samples along the first dimension)."""
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    elif isinstance(inputs, tuple | list):
        inputs = inputs[0]
    return int(len(inputs))


def wait_apart_cpu(seconds: float) -> None:
    wait_apart(torch.device("cpu"), seconds)  # other processes may use the CPU meanwhile


@torch.inference_mode()
def rested_latency(model: Callable[[Any], Any], inputs: Any, *, threads: int = 1,
                   bursts: int = REST_BURSTS, pause_s: float = REST_PAUSE_S,
                   burst_s: float = BURST_S, burst_samples: int = BURST_SAMPLES,
                   warmup_s: float = WARMUP_S, clock: Callable[[], float] = time.perf_counter,
                   sleep: Callable[[float], None] | None = None) -> Latency:
    """The CPU latency of ``model(inputs)`` at rest, as near as this moment allows:
    ``bursts`` bursts of samples ``pause_s`` apart, and the fastest burst's median (a
    disturbance only ever slows a model down, so the fastest burst is the least disturbed;
    nothing is scaled). The anchor of every ratio to this model (the run's reference): its
    ``ratio`` is 1 and its ``anchor_ms`` its own median."""
    sleep = sleep or wait_apart_cpu
    batch = samples_in(inputs)
    found: list[list[float]] = []
    warm = 0
    previous_threads = torch.get_num_threads()
    for burst in range(bursts):
        if burst:
            sleep(pause_s)
        with exclusive(torch.device("cpu")), steady_process():
            try:
                torch.set_num_threads(threads)
                side, calls = warm_up(model, inputs, clock, warmup_s if burst == 0 else 0.0)
                warm += calls
                times, start = [], clock()
                while len(times) < burst_samples or clock() - start < burst_s:
                    times += side.window(clock, 0.0, switched=False)
                found.append(times)
            finally:
                torch.set_num_threads(previous_threads)
    medians = [statistics.median(t) for t in found]
    fastest = sorted(found[medians.index(min(medians))])
    return Latency(median_ms=min(medians), p90_ms=p90(fastest), cv=spread(fastest),
                   samples=sum(len(t) for t in found), calls_per_sample=side.calls,
                   warmup_calls=warm, device="cpu", batch_size=batch, threads=threads,
                   attempts=bursts, raw_median_ms=statistics.median(t for f in found for t in f),
                   slowdown=round(max(medians) / min(medians), 4),
                   window_cv=round(spread(medians), 5),
                   # the reference against itself: the anchor of every ratio to it
                   ratio=1.0, ratio_low=1.0, ratio_high=1.0, anchor_ms=min(medians))


@dataclass(frozen=True)
class Side:
    """One side of a pair: a callable, its input, how many calls make one sample, and how
    long a sample took at the end of the warm-up (ms; 0 when unknown)."""

    fn: Callable[[Any], Any]
    x: Any
    calls: int
    sample_ms: float = 0.0

    def window(self, clock: Callable[[], float], window_s: float, *,
               switched: bool = True) -> list[float]:
        """Samples (ms per call) for at least ``window_s`` seconds, at least one. ``switched``
        (another model ran just before): after one call that is not timed, since that call
        finds the caches and the allocator as the other model left them, and a deployed
        model runs after itself. (At batch 256 the digits-cnn teacher took 56 ms right after
        a student and 44 ms right after itself; timing that call made the per-round ratios
        bimodal, 0.33 and 0.44 for a student that ran at 0.34 of the teacher on its own.)"""
        if switched:
            self.fn(self.x)
        times, start = [], clock()
        while not times or clock() - start < window_s:
            began = clock()
            for _ in range(self.calls):
                self.fn(self.x)
            times.append((clock() - began) / self.calls * 1e3)
        return times


def warm_up(fn: Callable[[Any], Any], x: Any, clock: Callable[[], float],
          warmup_s: float) -> tuple[Side, int]:
    """Warm ``fn`` up and size its samples so a sample lasts at least MIN_SAMPLE_S; the side
    and the warm-up calls. At least WARMUP_CALLS calls and ``warmup_s`` seconds, then on in
    groups while a group is still more than SETTLED faster than the one before (at most
    WARMUP_MAX_S): before the allocator was pinned, a new int8 executable at batch 256 ran
    21, 13, 9 ms and then drifted from 10.2 to 8.2 ms over 25 more calls, and ratios timed
    during such a drift never settle."""
    start, calls = clock(), 0
    while calls < WARMUP_CALLS or clock() - start < warmup_s:
        fn(x)
        calls += 1
    per_call, previous = (clock() - start) / calls, math.inf
    while clock() - start < WARMUP_MAX_S:
        began, group = clock(), 0
        while group < 1 or clock() - began < WARMUP_GROUP_S:
            fn(x)
            group += 1
        calls += group
        per_call = (clock() - began) / group
        if per_call >= (1 - SETTLED) * previous:
            break
        previous = per_call
    grouped = max(1, min(MAX_CALLS_PER_SAMPLE,
                         math.ceil(MIN_SAMPLE_S / max((clock() - start) / calls, 1e-9))))
    return Side(fn, x, grouped, sample_ms=grouped * per_call * 1e3), calls


@contextlib.contextmanager
def steady_process() -> Iterator[None]:
    """The process as every timing needs it: its allocator pinned (``pin_allocator``, once
    and for good) and Python's garbage collector off meanwhile, as ``timeit`` does (after a
    trial's training the process holds many objects, and a collection that lands in one
    side's window slows that side alone; collections run at the end)."""
    pin_allocator()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


#: compare_latency's choice is clear after only two rounds when the fastest form was this
#: far below ``decided_at`` in both: at 4-6% noise per round, a form at the margin reads 15%
#: below it about once in a thousand rounds. (At batch 256 an int8 form at a third of float
#: spent a third round, about 0.15 s of a 4-5 s trial, confirming what two had shown.)
CLEAR_BY = 0.15


@torch.inference_mode()
def compare_latency(forms: dict[str, Callable[[Any], Any]], inputs: Any, *, threads: int = 1,
                    rounds: int = 10, window_s: float = 0.0015, warmup_s: float = 0.005,
                    decided_at: float | None = None, min_rounds: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each of ``forms`` on ``inputs`` (CPU), for choosing
    between them: they are timed in turns, a short window each per round with the order
    forth and back, and each is reported as the first one's median times its median ratio to
    the first within a round. Both sides of every ratio saw the same machine moments, so a
    machine that slows down 1.5x for a second does not decide the choice. A window starts
    with an untimed call when another form ran just before (that first call is slower, see
    ``timing.paired``).

    ``decided_at``: the ratio to the first form that the choice turns on (e.g. 0.95: "5%
    faster"); timing stops as soon as the choice is clear: after ``min_rounds`` rounds, the
    fastest form so far was below it in every round, or every form was at or above it in
    every round; after two, the fastest was CLEAR_BY below it in both. (A form beaten by
    the fastest need not be placed against the first: while a mixed int8/float form
    hovered at 0.97 of float, its rounds ran to the end.)"""
    names = list(forms)
    previous_threads = torch.get_num_threads()
    with exclusive(torch.device("cpu")), steady_process():
        try:
            torch.set_num_threads(threads)
            for fn in forms.values():
                start = time.perf_counter()
                while time.perf_counter() - start < warmup_s:
                    fn(inputs)
            per_round: list[dict[str, float]] = []
            last = None
            for r in range(rounds):
                # forth, then back: no form always goes first, and the form at each end of a
                # round runs again first in the next, with no untimed call (at batch 256,
                # the float form's 15-35 ms call, every round but the first)
                order = names if r % 2 == 0 else names[::-1]
                per_round.append(_one_round(forms, order, inputs, window_s, after=last))
                last = order[-1]
                if decided_at is not None and _decided(per_round, names, decided_at, min_rounds):
                    break
        finally:
            torch.set_num_threads(previous_threads)
    base = names[0]
    base_ms = statistics.median(m[base] for m in per_round)
    return {name: base_ms * statistics.median(m[name] / m[base] for m in per_round)
            for name in names}


def _one_round(forms: dict[str, Callable[[Any], Any]], order: list[str], inputs: Any,
               window_s: float, *, after: str | None) -> dict[str, float]:
    """Each form's median ms per call in one window of at least ``window_s`` seconds, after
    an untimed call unless it ran just before (``after``; ``Side.window``: the caches still
    hold the form before)."""
    medians = {}
    for name in order:
        window = Side(forms[name], inputs, 1).window(time.perf_counter, window_s,
                                                     switched=name != after)
        medians[name], after = statistics.median(window), name
    return medians


def _decided(per_round: list[dict[str, float]], names: list[str], at: float,
             min_rounds: int) -> bool:
    """Whether the choice is clear (see ``compare_latency``): the fastest form (by median
    ratio to the first) was below ``at`` in every round, or every form was at or above it
    in every round, after ``min_rounds`` rounds; or, after two, the fastest was CLEAR_BY
    below ``at`` in both."""
    if len(per_round) < min(2, min_rounds):
        return False
    base = names[0]
    ratios = {name: [m[name] / m[base] for m in per_round] for name in names[1:]}
    fastest = min(ratios, key=lambda name: statistics.median(ratios[name]))
    if len(per_round) < min_rounds:
        return all(r < at - CLEAR_BY for r in ratios[fastest])
    return (all(r < at for r in ratios[fastest])
            or all(r >= at for values in ratios.values() for r in values))


def _steadiest(once: Callable[[], Latency], *, max_cv: float, max_repeats: int) -> Latency:
    """Measure until an attempt's window CV is at most ``max_cv`` (or ``max_repeats``
    repeats ran); keep the steadiest attempt."""
    attempts = [once()]
    while attempts[-1].window_cv > max_cv and len(attempts) <= max_repeats:
        attempts.append(once())
    best = min(attempts, key=lambda a: a.window_cv)
    return replace(best, attempts=len(attempts), unstable=best.window_cv > max_cv)


def p90(ordered: list[float]) -> float:
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def spread(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = statistics.fmean(values)
    return statistics.pstdev(values) / mean if mean > 0 else 0.0


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
    return replace(result, cuda_graph=captured, peak_memory_bytes=peak, window_cv=spread(blocks))
