"""Pareto dominance and the front's size as one number, on plain points.

Objectives are given as values to minimise (negate what is maximised). The study's own front
is Optuna's (``study.best_trials``); this is for the sets Optuna does not hold as a study: the
completed trials when none is feasible yet, the trials a pick chooses among, the front as it
grew trial by trial.

The hypervolume is exact for up to three objectives: the volume of the region dominated by
the points and bounded by a reference point that every counted point must beat in each
objective. Exact by slicing: sort by the first objective, and add each slab's 2-D area
(O(n^2 log n), fine for thousands).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)


def weakly_dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in any objective."""
    return all(x <= y for x, y in zip(a, b, strict=True))


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in any objective and better in at least one."""
    return weakly_dominates(a, b) and tuple(a) != tuple(b)


def non_dominated(points: Mapping[Key, Sequence[float]]) -> list[Key]:
    """The keys of the points no other point dominates (equal points all stay), in order."""
    return [k for k, p in points.items() if not any(dominates(q, p) for q in points.values())]


def _area_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (minimised) up to ``ref`` in two dimensions."""
    area, best_y = 0.0, ref[1]
    for x, y in sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1]):
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Hypervolume of ``points`` (each minimised in every coordinate) w.r.t. ``ref``; 1 to 3
    objectives. Points not better than ``ref`` in every coordinate add nothing."""
    dims = len(ref)
    inside = [tuple(p) for p in points if all(v < r for v, r in zip(p, ref, strict=True))]
    if not inside:
        return 0.0
    if dims == 1:
        return ref[0] - min(p[0] for p in inside)
    if dims == 2:
        return _area_2d(inside, (ref[0], ref[1]))
    if dims != 3:
        raise ValueError(f"hypervolume supports 1 to 3 objectives, got {dims}")
    inside.sort(key=lambda p: p[0])
    volume = 0.0
    for i, point in enumerate(inside):
        upper = inside[i + 1][0] if i + 1 < len(inside) else ref[0]
        if upper > point[0]:  # the slab [point.x, upper) is dominated by the first i+1 points
            volume += (upper - point[0]) * _area_2d([(p[1], p[2]) for p in inside[:i + 1]],
                                                    (ref[1], ref[2]))
    return volume
