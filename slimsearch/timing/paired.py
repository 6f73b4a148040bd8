"""Latency as a ratio to a reference timed in the same moments (CPU).

A shared machine slows down and speeds up by 1.2-2x from one second to the next, and from one
day to the next. A figure taken alone is only as good as the moment it was taken in; guessing
the slowdown from a probe and scaling by it was 15-25% off (benchmarks/RESULTS.md). So the
candidate is timed against a fixed reference (the run's teacher, on the same runtime) in short
alternating windows: round by round, candidate then reference, then reference then
candidate. A disturbance that lasts a window or longer slows both sides of a round alike, and
the median over rounds of the per-round ratio cancels it. The candidate's latency is then
``ratio x`` the reference's latency at rest (``anchor_ms``), measured once at the start of the
run (``timing.latency.rested_latency``).

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

from slimsearch.devices import exclusive
from slimsearch.timing.latency import (
    WARMUP_S,
    Latency,
    Side,
    p90,
    spread,
    steady_process,
    wait_apart_cpu,
    warm_up,
)

#: Each side of a round samples for at least this long (seconds), and at least one sample:
#: long enough for a robust median of a fast model, short enough that the machine rarely
#: changes between the two sides of a round.
WINDOW_S = 0.002
#: ... or for this fraction of the longer side's sample, if that is longer: the longer side
#: then takes one sample a window, and the shorter one as many as fill the same time.
EVEN_WINDOWS = 0.8
#: Stop once the ratio's interval is within this fraction of it (each side), i.e. once it can
#: be trusted (TRUSTED)... A trial needs its place among the others, not a third digit: on the
#: reference VM, at 4-6% noise per round, a digits-cnn student at batch 256 took 20-120
#: rounds to reach 2%, and at 3% (a median 22 rounds) timing still took a quarter of the
#: trials' time. The confirmation pass times the front to 2% (``confirm.PRECISION``).
PRECISION = 0.05
#: ... and at least this many rounds ran: the interval of up to 11 rounds is their lowest to
#: highest ratio, which holds the median with probability 1 - 2 / 2**n, 97% at 6 rounds and
#: below 95% at fewer.
MIN_ROUNDS = 6
#: Give up after this long (seconds) or this many rounds, and report the interval reached
#: (a small two-conv CNN at batch 256 against a 2.7x wider one reached +-2-3% in 3-6 s on
#: the reference VM with two busy processes: trusted).
MAX_SECONDS = 4.0
MAX_ROUNDS = 400
#: z for the ~95% interval of a median by order statistics.
Z = 1.96
#: A ratio whose interval is within this fraction of it (each side) is trusted; a wider one
#: is measured again after each of these pauses (seconds: disturbances on the reference VM
#: came and went within ~5 s), and if it never narrows, reported at its slow end.
TRUSTED = 0.05
RETRY_PAUSES_S = (1.0, 3.0)


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


def median_interval(values: list[float], *, z: float = Z) -> tuple[float, float]:
    """The distribution-free interval of the median of ``values``: the order statistics
    ``j`` and ``n + 1 - j`` (1-based) with ``j = floor((n - z sqrt(n)) / 2)``, at least the
    first (a normal approximation of the binomial, rounded toward the wider interval; about
    95% or more for z = 1.96)."""
    ordered = sorted(values)
    n = len(ordered)
    k = max(0, math.floor((n - z * math.sqrt(n)) / 2) - 1)
    return ordered[k], ordered[n - 1 - k]


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
    with exclusive(torch.device("cpu")), steady_process():
        try:
            torch.set_num_threads(threads)
            # The reference ran in every measurement of the run: its warm-up only settles it
            # (no minimum time). It goes first, so that the candidate's first window follows
            # the candidate's own warm-up and needs no untimed call.
            theirs, _ = warm_up(reference, reference_input, clock, 0.0)
            ours, warm = warm_up(candidate, candidate_input, clock, warmup_s)
            return _rounds(ours, theirs, warm, precision=precision, min_rounds=min_rounds,
                           max_seconds=max_seconds, max_rounds=max_rounds, window_s=window_s,
                           clock=clock)
        finally:
            torch.set_num_threads(previous_threads)


def _rounds(ours: Side, theirs: Side, warm: int, *, precision: float, min_rounds: int,
            max_seconds: float, max_rounds: int, window_s: float,
            clock: Callable[[], float]) -> Paired:
    # Both sides sample for about as long as the longer side's sample lasts: a 2.8 ms
    # reference beside a 20 ms model took one sample a round, just after its untimed call;
    # its median then read 3-4% slower than at rest and swung more, and the ratio took 11-14
    # rounds to settle instead of 6 (digits-cnn at batch 256, reference VM).
    window_s = max(window_s, EVEN_WINDOWS * max(ours.sample_ms, theirs.sample_ms) / 1e3)
    ratios: list[float] = []
    every_ours: list[float] = []
    every_theirs: list[float] = []
    begin = clock()
    settled = False
    while len(ratios) < max_rounds:
        # The order alternates (candidate first, then reference first: neither side always
        # goes first), so the first window of a round follows the same side (the round
        # before, or the candidate's warm-up) and needs no untimed call; the second follows
        # the other side and starts with one (``Side.window``). At batch 256 that saves a
        # 5-30 ms call of the candidate every other round.
        if len(ratios) % 2 == 0:
            c = ours.window(clock, window_s, switched=False)
            r = theirs.window(clock, window_s)
        else:
            r = theirs.window(clock, window_s, switched=False)
            c = ours.window(clock, window_s)
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
                  candidate_p90_ms=p90(ordered), candidate_cv=spread(ordered),
                  samples=len(ordered), calls_per_sample=ours.calls, warmup_calls=warm,
                  settled=settled, seconds=round(clock() - begin, 4))


def as_latency(paired: Paired, *, anchor_ms: float, batch_size: int, threads: int,
               trusted: float, attempts: int = 1, reference_batch: int | None = None) -> Latency:
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
        anchor_ms=anchor_ms, reference_batch=reference_batch)


def paired_latency(candidate: Callable[[Any], Any], candidate_input: Any,
                   reference: Callable[[Any], Any], reference_input: Any, *, anchor_ms: float,
                   batch_size: int, threads: int = 1, trusted: float = TRUSTED,
                   reference_batch: int | None = None,
                   pauses_s: tuple[float, ...] = RETRY_PAUSES_S,
                   sleep: Callable[[float], None] | None = None, **protocol: Any) -> Latency:
    """``measure_paired``, again after each pause in ``pauses_s`` while the narrowest interval
    so far is wider than ``trusted``; that narrowest one ``as_latency``. ``protocol``:
    ``measure_paired``'s keywords (precision, rounds, windows, clock). ``sleep``: how to
    wait (default: without holding the CPU, ``devices.wait_apart``). ``reference_batch``:
    the batch size ``reference_input`` holds (recorded; default ``batch_size``)."""
    sleep = sleep or wait_apart_cpu
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
                      trusted=trusted, attempts=attempts,
                      reference_batch=reference_batch or batch_size)


