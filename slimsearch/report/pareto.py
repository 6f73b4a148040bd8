"""The Pareto front's size as one number: the hypervolume, exact, for up to three objectives.

Objectives are given as values to minimise (negate what is maximised) and a reference point
that every counted trial must beat in each objective; the hypervolume is the volume of the
region dominated by the trials and bounded by the reference point. Exact by slicing: sort by
the first objective, and add each slab's 2-D area (O(n^2 log n), fine for thousands).
"""

from __future__ import annotations

from collections.abc import Sequence


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
