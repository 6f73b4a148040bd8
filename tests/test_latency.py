"""Latency: enough warm-up and samples, a sane summary, threads put back, and more work is slower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimsearch.evaluators import measure_latency


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency takes a machine-wide lock file; keep the tests' locks to themselves."""
    monkeypatch.setenv("SLIMSEARCH_LOCK_DIR", str(tmp_path / "locks"))


class ThreadSpy(nn.Module):
    """A tiny Linear that records ``torch.get_num_threads()`` on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)
        self.seen: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add(torch.get_num_threads())
        return self.linear(x)


def test_cpu_measurement_on_a_tiny_model() -> None:
    torch.manual_seed(0)
    model = ThreadSpy()
    before = torch.get_num_threads()
    result = measure_latency(model, torch.randn(1, 8), device=torch.device("cpu"), threads=1)
    assert torch.get_num_threads() == before
    assert model.seen == {1}  # timed with the requested thread count
    assert result.samples >= 500 and result.warmup_calls >= 100
    assert 1 <= result.calls_per_sample <= 16
    assert 0 < result.median_ms <= result.p90_ms
    assert result.median_ms < 50  # a 8x4 Linear takes microseconds
    assert result.cv >= 0
    assert (result.device, result.batch_size, result.threads) == ("cpu", 1, 1)
    metrics = result.as_metrics()
    assert metrics["latency_ms"] == result.median_ms and metrics["latency_p90_ms"] == result.p90_ms
    assert metrics["latency_samples"] == result.samples


def test_threads_are_restored_even_when_the_model_fails() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(Broken(), torch.randn(1, 8), device=torch.device("cpu"), threads=target)
    assert torch.get_num_threads() == before


def test_threads_other_than_the_current_count_are_used_and_then_restored() -> None:
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    model = ThreadSpy()
    result = measure_latency(model, torch.randn(2, 8), device=torch.device("cpu"), threads=target,
                             warmup=5, samples=20)
    assert model.seen == {target} and result.threads == target and result.batch_size == 2
    assert result.samples == 20 and result.warmup_calls >= 5
    assert torch.get_num_threads() == before


def test_more_work_is_measured_slower() -> None:
    torch.manual_seed(0)
    small = nn.Linear(16, 16)
    big = nn.Linear(1024, 1024)
    cpu = torch.device("cpu")
    fast = measure_latency(small, torch.randn(1, 16), device=cpu, warmup=10, samples=50)
    slow = measure_latency(big, torch.randn(64, 1024), device=cpu, warmup=3, samples=15)
    # ~134 MFLOP per call against ~0.5 kFLOP: at least an order of magnitude apart on any CPU
    assert slow.median_ms > 10 * fast.median_ms


@pytest.mark.gpu
def test_cuda_measurement() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    device = torch.device("cuda")
    before = torch.get_num_threads()
    result = measure_latency(nn.Linear(256, 256), torch.randn(8, 256), device=device,
                             warmup=20, samples=100)
    assert result.device.startswith("cuda") and result.samples == 100 and result.calls_per_sample == 1
    assert 0 < result.median_ms <= result.p90_ms
    assert torch.get_num_threads() == before
