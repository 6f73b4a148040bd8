"""Shared fixtures: the built-in digits-mlp task (small, bundled with scikit-learn, no download)."""

from __future__ import annotations

import pytest

from slimsearch.tasks import Task, make_task


@pytest.fixture(scope="session")
def digits_mlp_task() -> Task:
    """``make_task("digits-mlp", seed=0)``, built once per test session; treat it as read-only."""
    return make_task("digits-mlp", seed=0)
