"""Which confirmed latencies would move a trial on the front (``confirm._flagged``)."""

from __future__ import annotations

import dataclasses
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


def test_a_confirmation_of_an_earlier_front_is_ignored(tmp_path: Path) -> None:
    from slimsearch.atomic import write_json
    from slimsearch.report.data import _confirmed
    from slimsearch.run import RunFolder

    folder = RunFolder(tmp_path)
    write_json(folder.confirmed, {"confirmed": "t", "trials": {"1": {}, "2": {}}})
    assert _confirmed(folder, {1, 2}) is not None
    assert _confirmed(folder, {1, 2, 5}) is None  # a resumed search moved the front since


def test_a_cached_latency_is_reused_only_on_the_same_footing() -> None:
    from types import SimpleNamespace

    import torch

    from slimsearch.evaluators import Latency, LatencyEvaluator

    def latency(anchor: float | None) -> Latency:
        return Latency(median_ms=1.0, p90_ms=1.0, cv=0.0, samples=1, calls_per_sample=1,
                       warmup_calls=0, device="cpu", batch_size=1, threads=1, anchor_ms=anchor)

    cpu = torch.device("cpu")
    paired = SimpleNamespace(reference=SimpleNamespace(anchor_ms={1: 0.5}), device=cpu)
    alone = SimpleNamespace(reference=None, device=cpu)
    same = LatencyEvaluator._same_footing
    assert same(latency(0.5), paired, 1)
    assert not same(latency(0.4), paired, 1)  # another run's anchor
    assert not same(latency(None), paired, 1)  # probe-scaled, from before the ratio
    assert same(latency(None), alone, 1) and not same(latency(0.5), alone, 1)


def test_reported_batch_sizes_are_timed_for_the_front_once(monkeypatch) -> None:
    """A search times trials at the objective's batch size only; the confirmation pass times
    each Pareto trial at the others, to the reported figures' looser interval, against the
    teacher at its reference batch; a figure the trial's record already has is kept."""
    from types import SimpleNamespace

    import torch

    from slimsearch import confirm
    from slimsearch.evaluators import REPORTED_PRECISION, Latency

    asked = []

    def spy(run, x, reference_run, reference_x, **protocol) -> Latency:
        asked.append(protocol)
        return Latency(median_ms=2.0, p90_ms=2.1, cv=0.01, samples=8, calls_per_sample=1,
                       warmup_calls=0, device="cpu", batch_size=protocol["batch_size"],
                       threads=1, ratio=0.25, ratio_low=0.24, ratio_high=0.26)

    monkeypatch.setattr(confirm, "paired_latency", spy)
    ours = SimpleNamespace(native=lambda x: x, run=lambda x: x)
    reference = SimpleNamespace(anchor_ms={1: 0.5, 32: 8.0}, batch={1: 1, 32: 1},
                                executable=ours, inputs=lambda task, batch: batch)
    task = SimpleNamespace(example_inputs=lambda batch: batch)
    target = SimpleNamespace(batch_sizes=(1, 32, 64), threads=1)
    teacher = {"latency_ms": 0.5, "latency_b32_ms": 8.0, "latency_b64_ms": 16.0}
    searched = {"latency_b64_ms": 4.0, "latency_b64_ratio_low": 0.2,
                "latency_b64_ratio_high": 0.3}  # a run from before: its search timed batch 64
    reported = confirm._reported(ours, {"latency_ms": 0.1, **searched}, teacher, reference,
                                 task, target, torch.device("cpu"))
    assert reported["32"] == {"latency_ms": 2.0, "ratio_low": 0.24, "ratio_high": 0.26,
                              "unstable": False, "speedup": 4.0, "timed_in": "confirmation"}
    assert reported["64"]["timed_in"] == "search" and reported["64"]["speedup"] == 4.0
    assert len(asked) == 1  # batch 64 was not timed again
    assert asked[0]["batch_size"] == 32 and asked[0]["reference_batch"] == 1
    assert asked[0]["precision"] == asked[0]["trusted"] == REPORTED_PRECISION
    assert asked[0]["anchor_ms"] == 8.0


def _reading(accuracy: float, size: int, low: float, high: float, form: str) -> dict:
    return {"val_accuracy": accuracy, "size_bytes": size, "latency_ms": (low + high) / 2,
            "latency_ratio_low": low, "latency_ratio_high": high, "latency_signature": form}


def test_a_pair_is_undecided_where_their_readings_overlap_and_the_rest_is_better() -> None:
    from slimsearch.run import undecided

    baseline = _reading(0.90, 20_000, 0.095, 0.105, "a")
    assert undecided(_reading(0.91, 19_000, 0.099, 0.109, "b"), baseline)  # overlap
    assert not undecided(_reading(0.91, 19_000, 0.080, 0.090, "b"), baseline)  # faster: shown
    assert not undecided(_reading(0.91, 19_000, 0.110, 0.120, "b"), baseline)  # slower: shown
    assert not undecided(_reading(0.91, 19_000, 0.099, 0.109, "a"), baseline)  # one form: a tie
    assert not undecided(_reading(0.90, 19_000, 0.099, 0.109, "b"), baseline)  # as accurate
    assert not undecided(_reading(0.91, 20_000, 0.099, 0.109, "b"), baseline)  # as large
    alone = {k: v for k, v in _reading(0.91, 19_000, 0.099, 0.109, "b").items()
             if not k.startswith("latency_ratio")}
    assert not undecided(alone, baseline)  # timed alone (CUDA): its figure stands


def test_the_report_takes_the_side_by_side_verdict_against_a_baseline() -> None:
    baseline = TrialPoint(number=0, state="COMPLETE", recipe=None, baseline="uniform-int8",
                          error=None, pareto=False, seconds=1.0,
                          metrics=_reading(0.90, 20_000, 0.095, 0.105, "a"))
    read_slower = TrialPoint(number=1, state="COMPLETE", recipe=None, baseline=None,
                             error=None, pareto=True, seconds=1.0,
                             metrics=_reading(0.91, 19_000, 0.099, 0.109, "b"))
    data = ReportData(run_dir=Path("."), name="t", settings={"experiment": {}}, teacher={},
                      trials=[baseline, read_slower])
    assert data.against_baselines == [(baseline, [])]
    timed = {"baselines": {"0": {"1": {"ratio": 0.96, "ratio_low": 0.95, "ratio_high": 0.97,
                                       "faster": True}}}}
    data = ReportData(run_dir=Path("."), name="t", settings={"experiment": {}}, teacher={},
                      trials=[baseline, read_slower], confirmed=timed)
    assert data.against_baselines == [(baseline, [1])]
    from slimsearch.report.html import _baselines

    assert "timed side by side with it: trial 1 0.960x its latency [0.950, 0.970]" in _baselines(data)


def test_a_baseline_is_timed_against_the_most_accurate_undecided_trials_until_one_is_faster(
        tmp_path: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    import torch

    from slimsearch import confirm
    from slimsearch.compression import MODEL_FILE
    from slimsearch.evaluators import Latency
    from slimsearch.run import RunFolder

    folder = RunFolder(tmp_path)
    forms = {}

    def executable(model_file: Path) -> SimpleNamespace:
        number = int(model_file.parent.name)
        return forms.setdefault(number, SimpleNamespace(number=number, native=lambda x: x,
                                                        run=lambda x: x))

    ratios = {3: 1.01, 2: 0.95, 1: 0.90}  # trial: its latency over the baseline's
    timed = []

    def spy(run, x, reference_run, reference_x, **protocol) -> Latency:
        trial = next(f.number for f in forms.values() if f.run is run)
        timed.append(trial)
        ratio = ratios[trial]
        return Latency(median_ms=ratio, p90_ms=ratio, cv=0.01, samples=8, calls_per_sample=1,
                       warmup_calls=0, device="cpu", batch_size=protocol["batch_size"],
                       threads=1, ratio=ratio, ratio_low=ratio - 0.01, ratio_high=ratio + 0.01)

    monkeypatch.setattr(confirm, "paired_latency", spy)
    baseline = TrialPoint(number=0, state="COMPLETE", recipe=None, baseline="uniform-int8",
                          error=None, pareto=False, seconds=1.0,
                          metrics=_reading(0.90, 20_000, 0.095, 0.105, "a"))
    trials = [baseline] + [TrialPoint(number=n, state="COMPLETE", recipe=None, baseline=None,
                                      error=None, pareto=True, seconds=1.0,
                                      metrics=_reading(0.90 + n / 100, 19_000, 0.099, 0.109, "b"))
                           for n in (1, 2, 3)]
    for t in trials:
        folder.trial(t.number).mkdir(parents=True)
        (folder.trial(t.number) / MODEL_FILE).write_bytes(b"")
    data = ReportData(run_dir=tmp_path, name="t", settings={"experiment": {}}, teacher={},
                      trials=trials)
    target = SimpleNamespace(batch_size=1, threads=1)
    task = SimpleNamespace(example_inputs=lambda batch: batch)
    lines: list[str] = []
    found = confirm._against_baselines(data, folder, executable, task, target,
                                       torch.device("cpu"), say=lines.append)
    assert timed == [3, 2]  # the most accurate first; trial 1 is never timed
    assert {n: v["faster"] for n, v in found["0"].items()} == {"3": False, "2": True}
    assert "up to 3 searched trials side by side against baseline uniform-int8" in lines[0]
    # a trial that beats it by figures that can tell: nothing to time
    beaten = dict(trials[1].metrics, latency_ratio_low=0.05, latency_ratio_high=0.06,
                  latency_ms=0.055)
    trials[1] = dataclasses.replace(trials[1], metrics=beaten)
    timed.clear()
    data = dataclasses.replace(data, trials=trials)
    assert confirm._against_baselines(data, folder, executable, task, target,
                                      torch.device("cpu"), say=lines.append) == {}
    assert timed == []
