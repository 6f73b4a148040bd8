"""Device locks across processes: computations share a device, a latency measurement has it
alone, a waiting measurement is not starved, and nesting in one process never deadlocks."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from slimsearch import devices
from slimsearch.devices import computing, exclusive, step_aside

CPU = torch.device("cpu")


def _hold(kind: str, seconds: float, lock_dir: Path, ready: Path) -> None:
    devices._held.clear()  # a forked child shares the parent's lock handles: use its own
    with {"computing": computing, "exclusive": exclusive}[kind](CPU, lock_dir=lock_dir):
        ready.touch()
        time.sleep(seconds)


def hold(kind: str, seconds: float, lock_dir: Path, ready: Path) -> multiprocessing.Process:
    """Another process that holds ``computing`` or ``exclusive`` on the CPU for ``seconds``
    (forked: it starts in milliseconds, with torch already imported)."""
    process = multiprocessing.get_context("fork").Process(
        target=_hold, args=(kind, seconds, lock_dir, ready))
    process.start()
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert process.is_alive(), "the helper process died"
        assert time.monotonic() < deadline, "the helper process never took its lock"
        time.sleep(0.01)
    return process


@pytest.mark.parametrize("kind", ["computing", "exclusive"])
def test_a_measurement_waits_for_other_processes_on_the_device(kind: str, tmp_path: Path) -> None:
    other = hold(kind, 1.0, tmp_path, tmp_path / "ready")
    start = time.monotonic()
    with exclusive(CPU, lock_dir=tmp_path):
        waited = time.monotonic() - start
    other.join(timeout=30)
    assert waited >= 0.5, f"timed while another process was {kind} ({waited:.2f} s wait)"


def test_computations_share_the_device(tmp_path: Path) -> None:
    other = hold("computing", 1.0, tmp_path, tmp_path / "ready")
    start = time.monotonic()
    with computing(CPU, lock_dir=tmp_path):
        waited = time.monotonic() - start
    other.join(timeout=30)
    assert waited < 0.5


def test_computation_waits_while_a_measurement_runs(tmp_path: Path) -> None:
    other = hold("exclusive", 1.0, tmp_path, tmp_path / "ready")
    start = time.monotonic()
    with computing(CPU, lock_dir=tmp_path):
        waited = time.monotonic() - start
    other.join(timeout=30)
    assert waited >= 0.5


def test_measuring_inside_this_process_computation_does_not_deadlock(tmp_path: Path) -> None:
    with computing(CPU, lock_dir=tmp_path):
        with exclusive(CPU, lock_dir=tmp_path), exclusive(CPU, lock_dir=tmp_path):
            pass
        # back to computing: another process may compute beside us, but not measure
        other = hold("computing", 0.0, tmp_path, tmp_path / "ready")
        other.join(timeout=30)
        assert other.exitcode == 0
    with exclusive(CPU, lock_dir=tmp_path), computing(CPU, lock_dir=tmp_path):
        pass


def test_a_computation_steps_aside_for_a_waiting_measurement(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    with computing(CPU, lock_dir=tmp_path):
        step_aside(CPU, lock_dir=tmp_path)  # nobody waits: returns at once
        measurer = multiprocessing.get_context("fork").Process(
            target=_hold, args=("exclusive", 0.3, tmp_path, ready))
        measurer.start()
        time.sleep(0.3)
        assert not ready.exists()  # it waits while we compute...
        start = time.monotonic()
        step_aside(CPU, lock_dir=tmp_path)  # ...until we step aside between epochs
        assert ready.exists() and time.monotonic() - start >= 0.2  # we waited for it to finish
        measurer.join(timeout=30)
    assert measurer.exitcode == 0
