"""Choosing a trial from a finished search: under a deployment budget, or at the knee.

Plain data, no plotting and no storage: ``pick`` takes the completed trials' metrics and the
teacher's, and returns the choice with the reason and the runner-ups (tests compare it with
brute force). Sizes are bytes, latencies milliseconds, accuracy drops fractions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from slimsearch.report import pareto
from slimsearch.run import better_in, strictly_better

PREFERENCES = ("accuracy", "size", "latency")


@dataclass(frozen=True)
class Budget:
    """What the deployed model may cost; None = no limit on that."""

    max_latency_ms: float | None = None
    max_size_bytes: float | None = None
    #: The accuracy objective at most this far below the teacher's, in its units (for
    #: accuracy a fraction: 0.01 = 1 point).
    max_accuracy_drop: float | None = None
    #: What that objective is (the run's ``metric``, and whether it is a fraction).
    metric: str = "accuracy"
    fraction: bool = True

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.max_latency_ms, self.max_size_bytes,
                                          self.max_accuracy_drop))

    def violations(self, metrics: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
        """How far over each limit ``metrics`` is (0 = within): latency and size as a fraction
        of their limit (0.1 = 10% over), accuracy in accuracy points as a fraction (0.01 = one
        point more drop than allowed). ``closest`` adds them up, which is a ranking for a
        person to read, not a measure: the trials it lists are printed with their figures."""
        over = {}
        if self.max_latency_ms is not None:
            over["latency"] = max(0.0, metrics["latency_ms"] / self.max_latency_ms - 1)
        if self.max_size_bytes is not None:
            over["size"] = max(0.0, metrics["size_bytes"] / self.max_size_bytes - 1)
        if self.max_accuracy_drop is not None:
            # rounded: 0.98 - 0.97 is 0.010000000000000009 in floats, which must fit a 0.01 budget
            drop = round(teacher["val_accuracy"] - metrics["val_accuracy"], 9)
            over["accuracy"] = max(0.0, round(drop - self.max_accuracy_drop, 9))
        return over

    def describe(self) -> str:
        parts = []
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        if self.max_size_bytes is not None:
            parts.append(f"size <= {self.max_size_bytes:,.0f} bytes")
        if self.max_accuracy_drop is not None:
            drop = (f"{self.max_accuracy_drop * 100:g} points" if self.fraction
                    else f"{self.max_accuracy_drop:g}")
            parts.append(f"validation {self.metric} at most {drop} below the teacher's")
        return ", ".join(parts) or "no budget"


@dataclass(frozen=True)
class Pick:
    """The chosen trial number (None when nothing fits), why, and who came next."""

    trial: int | None
    reason: str
    runner_ups: list[int]
    #: When nothing fits: the trials closest to the budget, nearest first.
    closest: list[int]


def ranking_key(metrics: dict[str, Any], prefer: str) -> tuple[float, float, float]:
    """Sort key, smallest first: the preferred objective, then the others in the order
    accuracy, size, latency (so ties on accuracy go to the smaller, then the faster)."""
    values = {"accuracy": -metrics["val_accuracy"], "size": float(metrics["size_bytes"]),
              "latency": metrics["latency_ms"]}
    order = [prefer] + [p for p in PREFERENCES if p != prefer]
    return tuple(values[p] for p in order)  # type: ignore[return-value]


def knee_point(trials: dict[int, dict[str, Any]]) -> int:
    """The trial of the (non-dominated) front nearest the ideal point once each objective is
    scaled to 0 (best on the front) .. 1 (worst on the front): the most balanced trade-off."""
    front = non_dominated(trials)
    columns = {"accuracy": [-trials[n]["val_accuracy"] for n in front],
               "size": [float(trials[n]["size_bytes"]) for n in front],
               "latency": [trials[n]["latency_ms"] for n in front]}

    def scaled(name: str, value: float) -> float:
        low, high = min(columns[name]), max(columns[name])
        return 0.0 if high == low else (value - low) / (high - low)

    def distance(n: int) -> float:
        m = trials[n]
        return math.hypot(scaled("accuracy", -m["val_accuracy"]),
                          scaled("size", float(m["size_bytes"])),
                          scaled("latency", m["latency_ms"]))

    return min(front, key=lambda n: (distance(n), ranking_key(trials[n], "accuracy")))


def non_dominated(trials: dict[int, dict[str, Any]]) -> list[int]:
    """Trial numbers no other trial beats in all of accuracy, size and latency."""
    return pareto.non_dominated({n: (-m["val_accuracy"], float(m["size_bytes"]), m["latency_ms"])
                                 for n, m in trials.items()})


def dominating(trials: dict[int, dict[str, Any]], target: dict[str, Any], *,
               faster: dict[int, bool] | None = None) -> list[int]:
    """The trials of ``trials`` (number -> metrics) that strictly dominate ``target``'s
    metrics, most accurate first (ties: smaller, then faster). ``faster``: whether a trial
    is faster than the target where the two were timed side by side (``confirm.head_to_head``);
    that verdict replaces the comparison of their latency figures, taken apart."""
    faster = faster or {}

    def beats(n: int, m: dict[str, Any]) -> bool:
        if n not in faster:
            return strictly_better(m, target)
        return faster[n] and {"val_accuracy", "size_bytes"} <= set(better_in(m, target))

    return sorted((n for n, m in trials.items() if beats(n, m)),
                  key=lambda n: ranking_key(trials[n], "accuracy"))


def pick(trials: dict[int, dict[str, Any]], teacher: dict[str, Any], budget: Budget, *,
         prefer: str = "accuracy", runner_ups: int = 3) -> Pick:
    """The best trial under ``budget`` by ``prefer`` (ties: smaller, then faster), or the knee
    point when no budget is given. ``trials``: completed trial number -> metrics."""
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {PREFERENCES}, not {prefer!r}")
    if not trials:
        return Pick(None, "the run has no completed trial", [], [])
    if not budget.given:
        knee = knee_point(trials)
        others = sorted((n for n in non_dominated(trials) if n != knee),
                        key=lambda n: ranking_key(trials[n], prefer))
        return Pick(knee, "no budget given: the knee of the Pareto front (the most balanced "
                          f"trade-off of {budget.metric}, size and latency)",
                    others[:runner_ups], [])
    fitting = sorted((n for n, m in trials.items() if not any(budget.violations(m, teacher).values())),
                     key=lambda n: ranking_key(trials[n], prefer))
    if not fitting:
        closest = sorted(trials, key=lambda n: (sum(budget.violations(trials[n], teacher).values()),
                                                ranking_key(trials[n], prefer)))
        return Pick(None, f"no completed trial meets {budget.describe()}", [], closest[:runner_ups])
    best = {"accuracy": f"highest validation {budget.metric}", "size": "smallest file",
            "latency": "lowest latency"}[prefer]
    return Pick(fitting[0], f"the {best} of the {len(fitting)} trials that meet "
                            f"{budget.describe()}", fitting[1:1 + runner_ups], [])
