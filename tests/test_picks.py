"""Picking a trial: the best under a budget (checked against brute force) and the knee."""

from __future__ import annotations

import itertools
import random

import pytest

from slimsearch.report.picks import (
    Budget,
    dominating,
    knee_point,
    non_dominated,
    pick,
    ranking_key,
    strictly_better,
)

TEACHER = {"val_accuracy": 0.95, "size_bytes": 100_000, "latency_ms": 1.0}


def random_trials(seed: int, n: int = 40) -> dict[int, dict]:
    rng = random.Random(seed)
    # coarse values, so that ties on accuracy and size happen
    return {i: {"val_accuracy": rng.choice([0.90, 0.92, 0.93, 0.95]),
                "size_bytes": rng.choice([10_000, 20_000, 40_000, 80_000]),
                "latency_ms": round(rng.uniform(0.2, 1.2), 3)} for i in range(n)}


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("prefer", ["accuracy", "size", "latency"])
def test_pick_under_a_budget_is_what_brute_force_finds(seed: int, prefer: str) -> None:
    trials = random_trials(seed)
    budget = Budget(max_latency_ms=0.8, max_size_bytes=50_000, max_accuracy_drop=0.03)
    chosen = pick(trials, TEACHER, budget, prefer=prefer)
    fits = [n for n, m in trials.items() if m["latency_ms"] <= 0.8 and m["size_bytes"] <= 50_000
            and TEACHER["val_accuracy"] - m["val_accuracy"] <= 0.03]
    if not fits:
        assert chosen.trial is None and len(chosen.closest) == 3
        return
    order = {"accuracy": lambda m: (-m["val_accuracy"], m["size_bytes"], m["latency_ms"]),
             "size": lambda m: (m["size_bytes"], -m["val_accuracy"], m["latency_ms"]),
             "latency": lambda m: (m["latency_ms"], -m["val_accuracy"], m["size_bytes"])}[prefer]
    best = min(order(trials[n]) for n in fits)
    assert order(trials[chosen.trial]) == best
    assert chosen.trial in fits and set(chosen.runner_ups) <= set(fits)
    assert [ranking_key(trials[n], prefer) for n in chosen.runner_ups] == sorted(
        ranking_key(trials[n], prefer) for n in chosen.runner_ups)


def test_ties_on_accuracy_go_to_the_smaller_then_the_faster() -> None:
    trials = {1: {"val_accuracy": 0.9, "size_bytes": 200, "latency_ms": 0.1},
              2: {"val_accuracy": 0.9, "size_bytes": 100, "latency_ms": 0.5},
              3: {"val_accuracy": 0.9, "size_bytes": 100, "latency_ms": 0.4}}
    assert pick(trials, TEACHER, Budget(max_latency_ms=1.0)).trial == 3


def test_a_budget_nothing_meets_names_the_closest() -> None:
    trials = {1: {"val_accuracy": 0.9, "size_bytes": 2_000, "latency_ms": 0.1},
              2: {"val_accuracy": 0.9, "size_bytes": 1_100, "latency_ms": 0.1},
              3: {"val_accuracy": 0.9, "size_bytes": 5_000, "latency_ms": 0.1}}
    chosen = pick(trials, TEACHER, Budget(max_size_bytes=1_000))
    assert chosen.trial is None and chosen.closest == [2, 1, 3]
    assert "size <= 1,000 bytes" in chosen.reason


def test_the_knee_is_the_front_point_nearest_the_scaled_ideal() -> None:
    trials = random_trials(3, n=30)
    front = non_dominated(trials)
    for a, b in itertools.permutations(front, 2):  # no front point dominates another
        ma, mb = trials[a], trials[b]
        assert not (ma["val_accuracy"] >= mb["val_accuracy"] and ma["size_bytes"] <= mb["size_bytes"]
                    and ma["latency_ms"] <= mb["latency_ms"] and ma != mb)

    def scaled(n: int) -> float:
        columns = [[-trials[f]["val_accuracy"] for f in front],
                   [trials[f]["size_bytes"] for f in front], [trials[f]["latency_ms"] for f in front]]
        values = [-trials[n]["val_accuracy"], trials[n]["size_bytes"], trials[n]["latency_ms"]]
        return sum(((v - min(c)) / (max(c) - min(c)) if max(c) > min(c) else 0) ** 2
                   for v, c in zip(values, columns, strict=True))

    knee = knee_point(trials)
    assert knee in front and scaled(knee) == min(scaled(n) for n in front)
    assert pick(trials, TEACHER, Budget()).trial == knee


def test_report_analysis_history_and_layer_grid() -> None:
    from pathlib import Path

    from slimsearch.report.analysis import hypervolume_history, layer_grid
    from slimsearch.report.data import ReportData, TrialPoint

    def point(number: int, acc: float, size: int, latency: float, layers: dict) -> TrialPoint:
        recipe = {"student": {"width": 1.0}, "layers": layers}
        return TrialPoint(number=number, state="COMPLETE", recipe=recipe, baseline=None,
                          error=None, pareto=True, seconds=1.0,
                          metrics={"val_accuracy": acc, "size_bytes": size, "latency_ms": latency})

    trials = [point(0, 0.95, 100, 1.0, {"a": {"bits": 32, "sparsity": 0.0}}),
              point(1, 0.90, 50, 1.0, {"a": {"bits": 4, "sparsity": 0.5},
                                       "b": {"bits": 8, "sparsity": 0.0}})]
    data = ReportData(run_dir=Path("."), name="x", settings={}, trials=trials,
                      teacher={"val_accuracy": 0.95, "size_bytes": 100, "latency_ms": 1.0})
    # trial 0 is the teacher: on the box's edge in size, it adds nothing; trial 1 drops 5 of
    # the 15 points, at half the size and the teacher's latency: (1 - 1/3) x 0.5 x (2 - 1)
    assert hypervolume_history(data) == [(0, 0.0), (1, pytest.approx(1 / 3))]
    rows, layers, bits, sparsity = layer_grid(data)
    assert layers == ["a", "b"] and rows[0].startswith("trial 0")
    assert bits == [[32, None], [4, 8]] and sparsity == [[0.0, None], [0.5, 0.0]]


def test_an_accuracy_drop_exactly_at_the_budget_fits_despite_float_rounding() -> None:
    # 0.98 - 0.97 is 0.010000000000000009 in floats
    trials = {1: {"val_accuracy": 0.97, "size_bytes": 100, "latency_ms": 0.1}}
    teacher = {"val_accuracy": 0.98, "size_bytes": 1_000, "latency_ms": 1.0}
    assert pick(trials, teacher, Budget(max_accuracy_drop=0.01)).trial == 1


def test_picks_choose_among_the_trials_that_meet_the_experiments_constraints() -> None:
    from pathlib import Path

    from slimsearch.report.data import ReportData, TrialPoint

    def point(number: int, feasible: bool) -> TrialPoint:
        return TrialPoint(number, "COMPLETE", None, {"val_accuracy": 0.9, "size_bytes": 100,
                                                     "latency_ms": 0.1}, None, None, True, 1.0,
                          feasible=feasible)

    def data(*points: TrialPoint) -> ReportData:
        return ReportData(Path("run"), "run", {"experiment": {}}, TEACHER, list(points))

    assert [t.number for t in data(point(0, False), point(1, True)).candidates] == [1]
    # none feasible yet: the best so far, all of them
    assert [t.number for t in data(point(0, False), point(1, False)).candidates] == [0, 1]


def test_hypervolume_history_is_the_hypervolume_of_every_trial_so_far() -> None:
    from pathlib import Path

    from slimsearch.report.analysis import BOX_ACCURACY_DROP, BOX_LATENCY, hypervolume_history
    from slimsearch.report.data import ReportData, TrialPoint
    from slimsearch.report.pareto import hypervolume

    teacher = {"val_accuracy": 0.95, "size_bytes": 100, "latency_ms": 1.0}
    metrics = [m for m in random_trials(3, n=60).values()]
    for m in metrics:
        m["size_bytes"] //= 1000  # around the teacher's 100 bytes, so that the box matters
    trials = [TrialPoint(number=i, state="COMPLETE", recipe=None, baseline=None, error=None,
                         pareto=False, seconds=1.0, metrics=m) for i, m in enumerate(metrics)]
    data = ReportData(run_dir=Path("."), name="x", settings={}, trials=trials, teacher=teacher)
    scaled = [(max(0.0, 0.95 - m["val_accuracy"]) / BOX_ACCURACY_DROP, m["size_bytes"] / 100,
               m["latency_ms"]) for m in metrics]
    brute = [hypervolume(scaled[:i + 1], (1.0, 1.0, BOX_LATENCY)) for i in range(len(scaled))]
    history = hypervolume_history(data)
    assert [n for n, _ in history] == list(range(60))
    assert [v for _, v in history] == pytest.approx(brute)
    assert brute[-1] > brute[0]  # the figures move, so the comparison means something


def test_a_baseline_is_strictly_dominated_only_by_trials_better_in_all_three() -> None:
    baseline = {"val_accuracy": 0.95, "size_bytes": 40_000, "latency_ms": 0.5}
    trials = {1: {"val_accuracy": 0.96, "size_bytes": 30_000, "latency_ms": 0.4},  # better in all
              2: {"val_accuracy": 0.95, "size_bytes": 10_000, "latency_ms": 0.1},  # a tie: no
              3: {"val_accuracy": 0.97, "size_bytes": 20_000, "latency_ms": 0.6},  # slower
              4: {"val_accuracy": 0.98, "size_bytes": 39_999, "latency_ms": 0.49}}
    assert dominating(trials, baseline) == [4, 1]  # most accurate first
    assert not strictly_better(baseline, baseline)
    # brute force over random trials: exactly those better in every objective
    for seed in range(5):
        many = random_trials(seed)
        for m in many.values():
            expected = [k for k, o in many.items() if all(
                (o[key] > m[key]) if key == "val_accuracy" else (o[key] < m[key])
                for key in ("val_accuracy", "size_bytes", "latency_ms"))]
            assert sorted(dominating(many, m)) == sorted(expected)


def test_a_side_by_side_verdict_decides_latency_where_one_was_taken() -> None:
    baseline = {"val_accuracy": 0.95, "size_bytes": 40_000, "latency_ms": 0.5}
    trials = {1: {"val_accuracy": 0.96, "size_bytes": 30_000, "latency_ms": 0.51},  # read slower
              2: {"val_accuracy": 0.96, "size_bytes": 30_000, "latency_ms": 0.49},  # read faster
              3: {"val_accuracy": 0.94, "size_bytes": 30_000, "latency_ms": 0.40}}  # less accurate
    assert dominating(trials, baseline) == [2]
    # side by side, 1 was faster and 2 was not; 3 stays out whatever its speed
    assert dominating(trials, baseline, faster={1: True, 2: False, 3: True}) == [1]
    assert dominating(trials, baseline, faster={}) == [2]


def test_the_per_layer_view_shows_heads_channels_and_vocabulary_kept(tmp_path) -> None:
    import json

    from slimsearch.report.analysis import layer_grid, structure_grid
    from slimsearch.report.data import ReportData, TrialPoint

    layers = {"q": {"bits": 8, "sparsity": 0.5}, "ffn": {"bits": 4, "sparsity": 0.25}}
    records = {0: {"prune": {"structured": {
                   "q": {"heads_before": 12, "heads_after": 6, "channels_before": 384,
                         "channels_after": 192},
                   "ffn": {"channels_before": 1536, "channels_after": 1152}}}},
               1: {"student": {"vocabulary": {"emb": {"tokens": 100, "of": 400}}}}}
    trials = []
    for number, stages in records.items():
        folder = tmp_path / "trials" / f"{number:05d}"
        folder.mkdir(parents=True)
        (folder / "build.json").write_text(json.dumps({"stages": stages}))
        recipe = {"student": {"depth": 3 - number}, "layers": layers}
        if number == 1:
            recipe.update(vocabulary="seen", embedding_bits=4)
        trials.append(TrialPoint(number=number, state="COMPLETE", recipe=recipe, baseline=None,
                                 error=None, pareto=True, seconds=1.0,
                                 metrics={"val_accuracy": 0.9 - number / 10, "size_bytes": 10,
                                          "latency_ms": 1.0}))
    data = ReportData(run_dir=tmp_path, name="x", settings={}, trials=trials, teacher={})
    rows, _, _, _ = layer_grid(data)
    assert rows[1] == "trial 1 (depth=2, seen vocabulary, embeddings 4 bits)"
    columns, kept, text = structure_grid(data)
    assert columns == ["q", "ffn", "emb"]
    assert kept == [[0.5, 0.75, 1.0], [1.0, 1.0, 0.25]]
    assert text == [["6/12 heads", "1152/1536", ""], ["", "", "100/400 tokens"]]
