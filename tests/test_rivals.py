"""benchmarks/rivals.py: which searched trials face a hand-made recipe, and what a difference
of mean accuracies over a few builds can tell apart."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def rivals(monkeypatch):
    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])
    return importlib.import_module("rivals")


def figures(accuracy: float, size: int, latency: float) -> dict:
    return {"val_accuracy": accuracy, "size_bytes": size, "latency_ms": latency}


def test_a_rival_is_smaller_and_faster_and_the_most_accurate_of_those_first(rivals) -> None:
    target = figures(0.88, 1000, 10.0)
    searched = {
        1: figures(0.95, 2000, 5.0),   # more accurate, but larger: not a rival
        2: figures(0.95, 500, 10.0),   # as fast: not a rival (strictly faster is needed)
        3: figures(0.86, 900, 9.0),
        4: figures(0.90, 800, 9.5),
        5: figures(0.90, 700, 9.9),    # as accurate as 4: the lower number first
    }
    assert rivals.rivals(searched, target, 2) == [4, 5]
    assert rivals.rivals(searched, target, 5) == [4, 5, 3]
    assert rivals.rivals(searched, figures(0.5, 100, 1.0), 2) == []


def test_a_difference_within_two_standard_errors_is_a_tie(rivals) -> None:
    hand_made = [0.880, 0.885, 0.875, 0.880]
    assert rivals.verdict([0.900, 0.905, 0.895, 0.900], hand_made)[2] == "searched better"
    assert rivals.verdict([0.860, 0.865, 0.855, 0.860], hand_made)[2] == "hand-made better"
    # 0.5 points apart on the mean, with these spreads (sd 0.0041 each): not told apart
    difference, error, said = rivals.verdict([0.885, 0.890, 0.880, 0.885], hand_made)
    assert said == "tie"
    assert difference == pytest.approx(0.005)
    assert error == pytest.approx((2 * 0.0040825**2 / 4) ** 0.5, rel=1e-3)


def test_beat_expert_judge_refuses_a_folder_that_is_not_an_earlier_run(monkeypatch, tmp_path,
                                                                       capsys) -> None:
    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])
    beat_expert = importlib.import_module("beat_expert")
    monkeypatch.setattr(sys, "argv", ["beat_expert.py", "--judge", str(tmp_path), "--seeds", "1"])
    with pytest.raises(SystemExit) as exit_:
        beat_expert.main()
    assert exit_.value.code == 2
    assert "no seed-1/hand-made in it" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
