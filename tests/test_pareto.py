"""Hypervolume against brute force: counting the cells of a grid the points dominate."""

from __future__ import annotations

import itertools
import random

import pytest

from slimsearch.report.pareto import hypervolume


def brute_force(points: list[tuple[int, ...]], ref: tuple[int, ...]) -> int:
    """Unit cells [c, c+1) of the integer grid below ``ref`` dominated by some point."""
    cells = itertools.product(*(range(r) for r in ref))
    return sum(any(all(p[d] <= c[d] for d in range(len(ref))) for p in points) for c in cells)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_hypervolume_equals_brute_force_on_integer_points(dims: int, seed: int) -> None:
    rng = random.Random(seed)
    ref = tuple([9] * dims)
    points = [tuple(rng.randrange(0, 11) for _ in range(dims)) for _ in range(rng.randrange(1, 9))]
    assert hypervolume(points, ref) == pytest.approx(brute_force(points, ref))


def test_points_outside_the_reference_add_nothing() -> None:
    assert hypervolume([(5.0, 5.0, 5.0)], (4.0, 9.0, 9.0)) == 0.0
    assert hypervolume([], (1.0, 1.0, 1.0)) == 0.0
    assert hypervolume([(0.0, 0.0, 0.0)], (1.0, 2.0, 3.0)) == pytest.approx(6.0)
