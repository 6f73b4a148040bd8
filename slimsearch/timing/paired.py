"""Latency as a ratio to a reference timed in the same moments (CPU).

A shared machine slows down and speeds up by 1.2-2x from one second to the next, and from one
day to the next. A figure taken alone is only as good as the moment it was taken in; guessing
the slowdown from a probe and scaling by it was 15-25% off (benchmarks/RESULTS.md). So the
candidate is timed against a fixed reference (the run's teacher, on the same runtime) in short
alternating windows: round by round, candidate then reference, then reference then
candidate. A disturbance that lasts a window or longer slows both sides of a round alike, and
the median over rounds of the per-round ratio cancels it. The candidate's latency is then
``ratio x`` the reference's latency at rest (``anchor_ms``), measured once at the start of the
run by ``rested_latency``.

Sampling stops as soon as the ratio is known well enough: the distribution-free interval of
the median of the per-round ratios (about 95%) is within ``precision`` of it, after at least
``min_rounds`` rounds. A measurement that has not got there within ``max_seconds`` says so
(``settled`` False), with the interval it reached; ``paired_latency`` then measures again
after a pause, and reports a ratio that never narrows to ``TRUSTED`` at the slow end of its
interval, flagged ``unstable``: never faster than the measurement can show.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from slimsearch.devices import exclusive, wait_apart
from slimsearch.timing.latency import MAX_CALLS_PER_SAMPLE, MIN_SAMPLE_S, Latency

#: Each side of a round samples for at least this long (seconds), and at least one sample:
#: long enough for a robust median of a fast model, short enough that the machine rarely
#: changes between the two sides of a round.
WINDOW_S = 0.002
#: Stop once the ratio's interval is within this fraction of it (each side)...
PRECISION = 0.02
#: ... and at least this many rounds ran (the interval of fewer is not worth its name).
MIN_ROUNDS = 12
#: Give up after this long (seconds) or this many rounds, and report the interval reached
#: (a small two-conv CNN at batch 256 against a 2.7x wider one reached +-2-3% in 3-6 s on
#: the reference VM with two busy processes: trusted).
MAX_SECONDS = 4.0
MAX_ROUNDS = 400
#: Warm-up of each side before the first round (seconds, and at least 10 calls each).
WARMUP_S = 0.02
#: z for the ~95% interval of a median by order statistics.
Z = 1.96
#: A ratio whose interval is within this fraction of it (each side) is trusted; a wider one
#: is measured again after each of these pauses (seconds: disturbances on the reference VM
#: came and went within ~5 s), and if it never narrows, reported at its slow end.
TRUSTED = 0.05
RETRY_PAUSES_S = (1.0, 3.0)
#: The reference at rest: this many bursts, this many seconds apart, each of at least
#: BURST_S seconds and BURST_SAMPLES samples; the fastest burst's median is the anchor. The
#: reference VM ran the same model 1.6x slower for several seconds at a time with nothing
#: else running, so the bursts span a few seconds (~3 s: this runs once per run and once per
#: export, and a slow anchor only makes every trial of the run read slower alike).
REST_BURSTS = 6
REST_PAUSE_S = 0.5
BURST_S = 0.1
BURST_SAMPLES = 20


@dataclass(frozen=True)
class Paired:
    """A candidate's latency relative to a reference, timed in alternating windows."""

    #: median over rounds of (candidate's median / reference's median) in that round
    ratio: float
    #: the ~95% distribution-free interval of that median
    ratio_low: float
    ratio_high: float
    rounds: int
    #: Plain medians (ms per call) of every sample taken of each side in this session: what
    #: the machine gave, busy or not.
    candidate_ms: float
    reference_ms: float
    #: The candidate's samples: their 90th percentile (ms per call), spread (std / mean),
    #: count, calls in each, and the warm-up calls before them.
    candidate_p90_ms: float
    candidate_cv: float
    samples: int
    calls_per_sample: int
    warmup_calls: int
    #: Whether the interval reached ``precision`` before the time ran out.
    settled: bool
    seconds: float

    @property
    def half_width(self) -> float:
        """Half the interval, relative to the ratio (a fraction)."""
        return (self.ratio_high - self.ratio_low) / 2 / self.ratio

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _wait_apart(seconds: float) -> None:
    wait_apart(torch.device("cpu"), seconds)  # other processes may use the CPU meanwhile


def median_interval(values: list[float], *, z: float = Z) -> tuple[float, float]:
    """The distribution-free interval of the median of ``values``: the order statistics
    ``j`` and ``n + 1 - j`` (1-based) with ``j = floor((n - z sqrt(n)) / 2)``, at least the
    first (a normal approximation of the binomial, rounded toward the wider interval; about
    95% or more for z = 1.96)."""
    ordered = sorted(values)
    n = len(ordered)
    k = max(0, math.floor((n - z * math.sqrt(n)) / 2) - 1)
    return ordered[k], ordered[n - 1 - k]


@dataclass(frozen=True)
class _Side:
    """One side of a pair: a callable, its input, and how many calls make one sample."""

    fn: Callable[[Any], Any]
    x: Any
    calls: int

    def window(self, clock: Callable[[], float], window_s: float) -> list[float]:
        """Samples (ms per call) for at least ``window_s`` seconds, at least one."""
        times, start = [], clock()
        while not times or clock() - start < window_s:
            began = clock()
            for _ in range(self.calls):
                self.fn(self.x)
            times.append((clock() - began) / self.calls * 1e3)
        return times


def _warm(fn: Callable[[Any], Any], x: Any, clock: Callable[[], float],
          warmup_s: float) -> tuple[_Side, int]:
    """Warm ``fn`` up (at least 10 calls and ``warmup_s`` seconds) and size its samples so a
    sample lasts at least MIN_SAMPLE_S; the side and the warm-up calls."""
    start, calls = clock(), 0
    while calls < 10 or clock() - start < warmup_s:
        fn(x)
        calls += 1
    per_call = (clock() - start) / calls
    return _Side(fn, x, max(1, min(MAX_CALLS_PER_SAMPLE,
                                   math.ceil(MIN_SAMPLE_S / max(per_call, 1e-9))))), calls


@torch.inference_mode()
def measure_paired(candidate: Callable[[Any], Any], candidate_input: Any,
                   reference: Callable[[Any], Any], reference_input: Any, *, threads: int = 1,
                   precision: float = PRECISION, min_rounds: int = MIN_ROUNDS,
                   max_seconds: float = MAX_SECONDS, max_rounds: int = MAX_ROUNDS,
                   window_s: float = WINDOW_S, warmup_s: float = WARMUP_S,
                   clock: Callable[[], float] = time.perf_counter) -> Paired:
    """Time ``candidate(candidate_input)`` against ``reference(reference_input)`` on the CPU
    with ``threads`` threads, in alternating windows, until the ratio's interval is within
    ``precision`` (see the module's doc). Holds the CPU exclusively (``devices.exclusive``)."""
    previous_threads = torch.get_num_threads()
    with exclusive(torch.device("cpu")):
        try:
            torch.set_num_threads(threads)
            ours, warm = _warm(candidate, candidate_input, clock, warmup_s)
            theirs, _ = _warm(reference, reference_input, clock, warmup_s)
            return _rounds(ours, theirs, warm, precision=precision, min_rounds=min_rounds,
                           max_seconds=max_seconds, max_rounds=max_rounds, window_s=window_s,
                           clock=clock)
        finally:
            torch.set_num_threads(previous_threads)


def _rounds(ours: _Side, theirs: _Side, warm: int, *, precision: float, min_rounds: int,
            max_seconds: float, max_rounds: int, window_s: float,
            clock: Callable[[], float]) -> Paired:
    ratios: list[float] = []
    every_ours: list[float] = []
    every_theirs: list[float] = []
    begin = clock()
    settled = False
    while len(ratios) < max_rounds:
        if len(ratios) % 2 == 0:  # the order alternates: neither side always goes first
            c, r = ours.window(clock, window_s), theirs.window(clock, window_s)
        else:
            r, c = theirs.window(clock, window_s), ours.window(clock, window_s)
        every_ours += c
        every_theirs += r
        ratios.append(statistics.median(c) / statistics.median(r))
        if len(ratios) >= min_rounds:
            low, high = median_interval(ratios)
            if (high - low) / 2 <= precision * statistics.median(ratios):
                settled = True
                break
            if clock() - begin >= max_seconds:
                break
    low, high = median_interval(ratios)
    ordered = sorted(every_ours)
    return Paired(ratio=statistics.median(ratios), ratio_low=low, ratio_high=high,
                  rounds=len(ratios), candidate_ms=statistics.median(ordered),
                  reference_ms=statistics.median(every_theirs),
                  candidate_p90_ms=_p90(ordered), candidate_cv=_cv(ordered),
                  samples=len(ordered), calls_per_sample=ours.calls, warmup_calls=warm,
                  settled=settled, seconds=round(clock() - begin, 4))


def _p90(ordered: list[float]) -> float:
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def _cv(values: list[float]) -> float:
    mean = statistics.fmean(values)
    return statistics.pstdev(values) / mean if len(values) > 1 and mean > 0 else 0.0


def as_latency(paired: Paired, *, anchor_ms: float, batch_size: int, threads: int,
               trusted: float, attempts: int = 1) -> Latency:
    """The candidate's latency at the speed the reference ran at rest (``anchor_ms``, ms per
    call): ``ratio x anchor_ms``. A ratio whose interval is still wider than ``trusted`` (a
    fraction of it, each side) is ``unstable`` and reported at the top of its interval. The
    p90 is the candidate's own, brought to the reference's speed at rest the same way."""
    unstable = paired.half_width > trusted
    median = (paired.ratio_high if unstable else paired.ratio) * anchor_ms
    to_rest = anchor_ms / paired.reference_ms
    return Latency(
        median_ms=median, p90_ms=max(median, paired.candidate_p90_ms * to_rest),
        cv=paired.candidate_cv,
        samples=paired.samples, calls_per_sample=paired.calls_per_sample,
        warmup_calls=paired.warmup_calls, device="cpu", batch_size=batch_size,
        threads=threads, attempts=attempts, unstable=unstable,
        raw_median_ms=paired.candidate_ms, slowdown=round(paired.reference_ms / anchor_ms, 4),
        window_cv=round(paired.half_width, 5), ratio=paired.ratio, ratio_low=paired.ratio_low,
        ratio_high=paired.ratio_high, rounds=paired.rounds, reference_ms=paired.reference_ms,
        anchor_ms=anchor_ms)


def paired_latency(candidate: Callable[[Any], Any], candidate_input: Any,
                   reference: Callable[[Any], Any], reference_input: Any, *, anchor_ms: float,
                   batch_size: int, threads: int = 1, trusted: float = TRUSTED,
                   pauses_s: tuple[float, ...] = RETRY_PAUSES_S,
                   sleep: Callable[[float], None] | None = None, **protocol: Any) -> Latency:
    """``measure_paired``, again after each pause in ``pauses_s`` while the narrowest interval
    so far is wider than ``trusted``; that narrowest one ``as_latency``. ``protocol``:
    ``measure_paired``'s keywords (precision, rounds, windows, clock). ``sleep``: how to
    wait (default: without holding the CPU, ``devices.wait_apart``)."""
    sleep = sleep or _wait_apart
    best = measure_paired(candidate, candidate_input, reference, reference_input,
                          threads=threads, **protocol)
    attempts = 1
    for pause in pauses_s:
        if best.half_width <= trusted:
            break
        sleep(pause)
        again = measure_paired(candidate, candidate_input, reference, reference_input,
                               threads=threads, **protocol)
        attempts += 1
        best = again if again.half_width < best.half_width else best
    return as_latency(best, anchor_ms=anchor_ms, batch_size=batch_size, threads=threads,
                      trusted=trusted, attempts=attempts)


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
    sleep = sleep or _wait_apart
    batch = int(len(inputs))
    found: list[list[float]] = []
    warm = 0
    previous_threads = torch.get_num_threads()
    for burst in range(bursts):
        if burst:
            sleep(pause_s)
        with exclusive(torch.device("cpu")):
            try:
                torch.set_num_threads(threads)
                side, calls = _warm(model, inputs, clock, warmup_s if burst == 0 else 0.0)
                warm += calls
                times, start = [], clock()
                while len(times) < burst_samples or clock() - start < burst_s:
                    times += side.window(clock, 0.0)
                found.append(times)
            finally:
                torch.set_num_threads(previous_threads)
    medians = [statistics.median(t) for t in found]
    fastest = sorted(found[medians.index(min(medians))])
    return Latency(median_ms=min(medians), p90_ms=_p90(fastest), cv=_cv(fastest),
                   samples=sum(len(t) for t in found), calls_per_sample=side.calls,
                   warmup_calls=warm, device="cpu", batch_size=batch, threads=threads,
                   attempts=bursts, raw_median_ms=statistics.median(t for f in found for t in f),
                   slowdown=round(max(medians) / min(medians), 4),
                   window_cv=round(_cv(medians), 5),
                   # the reference against itself: the anchor of every ratio to it
                   ratio=1.0, ratio_low=1.0, ratio_high=1.0, anchor_ms=min(medians))
