"""Which confirmed latencies would move a trial on the front (``confirm._flagged``)."""

from __future__ import annotations

from pathlib import Path

from slimsearch.confirm import _flagged
from slimsearch.report.data import ReportData, TrialPoint


def point(number: int, accuracy: float, size: int, latency: float) -> TrialPoint:
    return TrialPoint(number=number, state="COMPLETE", recipe=None, baseline=None, error=None,
                      metrics={"val_accuracy": accuracy, "size_bytes": size,
                               "latency_ms": latency},
                      pareto=True, seconds=1.0)


def test_a_confirmed_latency_that_moves_a_trial_is_flagged_and_noise_is_not() -> None:
    # 0: accurate and slow; 1: smaller and fast; 2: as small as 1, less accurate, fastest
    trials = [point(0, 0.98, 4000, 0.30), point(1, 0.95, 1000, 0.10), point(2, 0.93, 1000, 0.08)]
    data = ReportData(run_dir=Path("."), name="t", settings={"experiment": {}}, teacher={},
                      trials=trials)

    def found(**latency: float) -> dict:
        return {n[1:]: {"latency_ms": ms, "search_latency_ms": trials[int(n[1:])].metrics[
            "latency_ms"]} for n, ms in latency.items()}

    same = _flagged(data, found(t0=0.301, t1=0.102, t2=0.0795))
    assert [c["flag"] for c in same.values()] == [None, None, None]
    # trial 2 confirmed slower than trial 1, which is as small and more accurate: dominated
    off = _flagged(data, found(t0=0.30, t1=0.10, t2=0.12))
    assert off["2"]["flag"] == "off the front" and off["1"]["flag"] is None
    # trial 1 confirmed slower than trial 0: still on the front (smaller), but its place in
    # the order by latency changed by far more than the noise
    order = _flagged(data, found(t0=0.30, t1=0.40, t2=0.08))
    assert order["1"]["flag"] == "order by latency" and order["2"]["flag"] is None
