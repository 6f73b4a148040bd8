"""Latency: enough warm-up and samples, a sane summary, threads put back, and more work is slower."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from slimsearch.evaluators import Latency, LatencyCache, measure_latency
from slimsearch.timing.latency import _measure_cpu, _steadiest
from slimsearch.timing.machine_probe import MachineProbe


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
    # >= 500 samples taken; the median is of the undisturbed ones when >= 100 were (else of
    # all of them, scaled)
    assert result.samples >= (100 if not result.disturbed else 500)
    assert result.warmup_calls >= 100
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
    assert result.samples >= 20 and result.warmup_calls >= 5
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


def _latency(cv: float, median_ms: float = 1.0) -> Latency:
    return Latency(median_ms=median_ms, p90_ms=median_ms * 1.1, cv=cv * 3, samples=500,
                   calls_per_sample=1, warmup_calls=100, device="cpu", batch_size=1, threads=1,
                   window_cv=cv)


def test_a_spread_above_the_threshold_is_measured_again_and_the_steadiest_kept() -> None:
    attempts = iter([_latency(0.5, 3.0), _latency(0.2, 1.2), _latency(0.3, 2.0)])
    result = _steadiest(lambda: next(attempts), max_cv=0.1, max_repeats=2)
    assert (result.attempts, result.window_cv, result.median_ms, result.unstable) == (3, 0.2, 1.2, True)
    calm = iter([_latency(0.05), _latency(0.5)])
    result = _steadiest(lambda: next(calm), max_cv=0.1, max_repeats=2)
    assert (result.attempts, result.unstable) == (1, False)
    late = iter([_latency(0.4), _latency(0.08)])
    assert _steadiest(lambda: next(late), max_cv=0.1, max_repeats=5).unstable is False


def test_a_disturbed_measurement_is_repeated_and_an_undisturbed_one_preferred() -> None:
    from dataclasses import replace

    # scaled for a disturbed machine (steady-looking windows, 1.2 ms), then undisturbed
    attempts = iter([replace(_latency(0.01, 1.2), disturbed=True), _latency(0.05, 1.0)])
    result = _steadiest(lambda: next(attempts), max_cv=0.1, max_repeats=1)
    assert (result.attempts, result.median_ms, result.disturbed) == (2, 1.0, False)
    # disturbed both times: the steadier of the two, still flagged
    both = iter([replace(_latency(0.05, 1.3), disturbed=True),
                 replace(_latency(0.02, 1.2), disturbed=True)])
    result = _steadiest(lambda: next(both), max_cv=0.1, max_repeats=1)
    assert (result.attempts, result.median_ms, result.disturbed) == (2, 1.2, True)


def test_extra_batch_sizes_get_their_own_metric_names() -> None:
    metrics = _latency(0.1, 2.0).as_metrics("_b256")
    assert metrics["latency_b256_ms"] == 2.0 and metrics["latency_b256_window_cv"] == 0.1
    assert "latency_ms" not in metrics


def test_the_cache_is_shared_through_its_file_and_counts_hits(tmp_path: Path) -> None:
    path = tmp_path / "latency_cache.json"
    first = LatencyCache(path)
    assert first.get("abc") is None and first.hit_rate == 0.0
    first.put("abc", _latency(0.05, 1.5))
    second = LatencyCache(path)  # another worker, or a resumed run
    assert second.get("abc") == _latency(0.05, 1.5)
    assert (second.hits, second.misses, second.hit_rate) == (1, 0, 1.0)
    path.write_text("{not json")  # a damaged cache costs a measurement, never a trial
    assert LatencyCache(path).get("abc") is None
    memory = LatencyCache()
    memory.put("k", _latency(0.1))
    assert memory.get("k") == _latency(0.1)


def test_the_evaluator_measures_an_executed_form_once_per_batch(tmp_path: Path) -> None:
    from slimsearch.compression import MODEL_FILE, CompressedModel, save_artifact
    from slimsearch.evaluators import EvalContext, LatencyEvaluator
    from slimsearch.experiment import TargetConfig
    from slimsearch.runtimes import RUNTIMES
    from slimsearch.tasks import factory_path, make_task
    from slimsearch.tasks.digits import digits_mlp

    task = make_task("digits-mlp", seed=0)
    model = digits_mlp(width=0.25, depth=1)
    path = save_artifact(CompressedModel(model=model, factory=factory_path(digits_mlp),
                                         kwargs={"width": 0.25, "depth": 1}), tmp_path / MODEL_FILE)
    target = TargetConfig(device="cpu", batch_sizes=(1, 8))
    cpu = torch.device("cpu")
    executable = RUNTIMES["torch"].materialize(path, target=target, device=cpu, out_dir=tmp_path,
                                               example=task.example_inputs(1))
    cache = LatencyCache(tmp_path / "cache.json")
    context = EvalContext(task=task, executable=executable, model=model, target=target,
                          device=cpu, latency_cache=cache)
    evaluator = LatencyEvaluator(warmup=5, samples=20)
    first, again = evaluator(context), evaluator(context)
    assert not first["latency_cached"] and not first["latency_b8_cached"]
    assert again["latency_cached"] and again["latency_b8_cached"]
    assert again["latency_ms"] == first["latency_ms"]
    assert again["latency_b8_ms"] == first["latency_b8_ms"]
    assert first["latency_signature"] != first["latency_b8_signature"]
    assert (cache.hits, cache.misses) == (2, 2)


class FakeClock:
    """A clock that only moves when fake work runs: each model call takes the next duration
    of ``durations_s`` (an iterator), each probe call ``probe_s[0]`` seconds."""

    def __init__(self, durations_s, probe_s: float = 10e-6) -> None:
        self.now = 0.0
        self.durations = iter(durations_s)
        self.probe_s = [probe_s]

    def __call__(self) -> float:
        return self.now

    def model(self, _x: object) -> None:
        self.now += next(self.durations)

    def probe(self, lock_dir: Path) -> MachineProbe:
        def work() -> None:
            self.now += self.probe_s[0]
        return MachineProbe(1, lock_dir=lock_dir, workload=work, clock=self)


def test_warm_up_is_discarded_and_the_median_of_the_samples_reported(tmp_path: Path) -> None:
    # 100 warm-up calls of 5 ms, 10 calibration calls of 1 ms (long enough: 1 call per
    # sample), then samples of 1.0 ms and 1.5 ms, 3 of every 5 at 1.0 ms
    pattern = itertools.cycle([0.001, 0.0015, 0.001, 0.0015, 0.001])
    clock = FakeClock(itertools.chain([0.005] * 100, [0.001] * 10, pattern))
    result = _measure_cpu(clock.model, None, warmup=100, samples=500, batch=1, threads=1,
                          clock=clock, probe=clock.probe(tmp_path))
    assert result.calls_per_sample == 1 and result.warmup_calls == 110
    # (a window whose few samples happen to be mostly 1.5 ms reads as disturbed: left out)
    assert result.samples >= 500 and not result.disturbed and result.quiet_fraction > 0.95
    assert result.median_ms == pytest.approx(1.0)
    assert result.p90_ms == pytest.approx(1.5)
    assert result.slowdown == pytest.approx(1.0) and result.raw_median_ms == pytest.approx(1.0)
    times = [1.0, 1.5, 1.0, 1.5, 1.0]
    mean = sum(times) / 5
    expected_cv = (sum((t - mean) ** 2 for t in times) / 5) ** 0.5 / mean
    assert result.cv == pytest.approx(expected_cv, rel=0.02)


def test_a_disturbed_machine_is_detected_and_its_slowdown_taken_out(tmp_path: Path) -> None:
    # the probe runs 10 us undisturbed (floor), then the machine slows down 1.5x: probe
    # 15 us, model 1.5 ms instead of 1.0 ms, and it stays so past the waiting time
    clock = FakeClock(itertools.chain([0.0015] * 150, itertools.repeat(0.0015)))
    probe = clock.probe(tmp_path)
    clock.probe_s[0] = 15e-6
    result = _measure_cpu(clock.model, None, warmup=100, samples=500, batch=1, threads=1,
                          quiet_wait_s=2.0, clock=clock, probe=probe)
    assert result.disturbed and result.quiet_fraction == 0.0
    assert result.slowdown == pytest.approx(1.5)
    assert result.raw_median_ms == pytest.approx(1.5)
    assert result.median_ms == pytest.approx(1.0)  # what the model takes undisturbed
    assert clock.now >= 2.0  # it waited for an undisturbed moment before scaling
    # the floor is kept for the next process on this machine
    assert MachineProbe(1, lock_dir=tmp_path, workload=lambda: None).floor_us == pytest.approx(10)


def test_the_probe_is_chosen_by_the_kind_of_model_and_keeps_its_own_floor(tmp_path: Path) -> None:
    from slimsearch.timing.machine_probe import kind_for

    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    assert kind_for(mlp) == "linear" and kind_for(cnn) == "conv"
    assert kind_for(lambda x: x) == "linear"  # a callable hides its layers: the caller says

    class QuantizedConv2d(nn.Module):  # int8 kernels' modules are not _ConvNd subclasses
        pass
    assert kind_for(nn.Sequential(QuantizedConv2d())) == "conv"

    # each kind learns and stores its own floor: a conv reading never judges a Linear one
    for kind, reading_s in (("linear", 10e-6), ("conv", 35e-6)):
        clock = FakeClock([])

        def work(clock: FakeClock = clock, reading_s: float = reading_s) -> None:
            clock.now += reading_s
        probe = MachineProbe(1, kind=kind, lock_dir=tmp_path, workload=work, clock=clock)
        probe.burst(), probe.burst()
        probe.save()
    floors = {kind: MachineProbe(1, kind=kind, lock_dir=tmp_path, workload=lambda: None).floor_us
              for kind in ("linear", "conv")}
    assert floors == {"linear": pytest.approx(10), "conv": pytest.approx(35)}
    with pytest.raises(ValueError, match="probe kind"):
        MachineProbe(1, kind="gpu", lock_dir=tmp_path, workload=lambda: None)


def test_a_measurement_says_which_probe_judged_it() -> None:
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)).eval()
    x = torch.randn(1, 1, 8, 8)
    assert measure_latency(cnn, x, device=torch.device("cpu"), warmup=5, samples=20).probe == "conv"
    assert measure_latency(lambda t: cnn(t), x, device=torch.device("cpu"), warmup=5, samples=20,
                           probe="conv").probe == "conv"
    assert measure_latency(lambda t: cnn(t), x, device=torch.device("cpu"), warmup=5,
                           samples=20).probe == "linear"


def test_undisturbed_windows_are_kept_and_disturbed_ones_left_out(tmp_path: Path) -> None:
    # alternate 0.5 s quiet (model 1.0 ms) and 0.5 s disturbed (model 1.6 ms, probe 16 us)
    clock = FakeClock([])
    probe = clock.probe(tmp_path)

    def durations():
        while True:
            disturbed = int(clock.now / 0.5) % 2 == 1
            clock.probe_s[0] = 16e-6 if disturbed else 10e-6
            yield 0.0016 if disturbed else 0.001

    clock.durations = durations()
    result = _measure_cpu(clock.model, None, warmup=100, samples=500, batch=1, threads=1,
                          quiet_wait_s=5.0, clock=clock, probe=probe)
    assert not result.disturbed and 0 < result.quiet_fraction < 1
    assert result.median_ms == pytest.approx(1.0)


def test_short_calls_are_grouped_so_a_sample_outlasts_the_clock_resolution(tmp_path: Path) -> None:
    # 10 us per call: ceil(25 us / 10 us) = 3 calls per sample, latency reported per call
    clock = FakeClock(itertools.repeat(10e-6))
    result = _measure_cpu(clock.model, None, warmup=5, samples=20, batch=1, threads=1,
                          clock=clock, probe=clock.probe(tmp_path))
    assert result.calls_per_sample == 3
    assert result.median_ms == pytest.approx(0.01) and result.cv == pytest.approx(0, abs=1e-9)


def test_forms_compared_in_turns_rank_more_work_slower() -> None:
    from slimsearch.timing.latency import compare_latency

    torch.manual_seed(0)
    layer = nn.Linear(256, 256)
    x = torch.randn(8, 256)

    def twice(t: torch.Tensor) -> torch.Tensor:
        return layer(layer(t))

    timed = compare_latency({"once": layer, "twice": twice}, x, rounds=6, window_s=0.001)
    assert set(timed) == {"once", "twice"}
    assert timed["twice"] > 1.5 * timed["once"] > 0


def test_a_probe_a_little_slower_than_its_floor_does_not_scale_an_undisturbed_model(
        tmp_path: Path) -> None:
    # the probe reads 1.15x its floor for the whole measurement while the model keeps its
    # 1.0 ms (seen on the reference VM: scaling by it reported the CNN 10% fast)
    clock = FakeClock(itertools.repeat(0.001))
    probe = clock.probe(tmp_path)
    clock.probe_s[0] = 11.5e-6
    result = _measure_cpu(clock.model, None, warmup=100, samples=500, batch=1, threads=1,
                          clock=clock, probe=probe)
    assert not result.disturbed and result.quiet_fraction == 1.0
    assert result.median_ms == pytest.approx(1.0) and result.slowdown == pytest.approx(1.15)


def test_a_disturbance_the_probe_misses_is_left_out_by_the_windows_own_medians(
        tmp_path: Path) -> None:
    # the probe always reads undisturbed, but every other 0.1 s the model runs 1.3x slower
    # (on the reference VM the CNN slowed without the probe): those windows are left out
    clock = FakeClock([])
    probe = clock.probe(tmp_path)

    def durations():
        while True:
            yield 0.0013 if int(clock.now / 0.1) % 2 == 1 else 0.001

    clock.durations = durations()
    result = _measure_cpu(clock.model, None, warmup=100, samples=500, batch=1, threads=1,
                          quiet_wait_s=5.0, clock=clock, probe=probe)
    assert not result.disturbed and 0.3 < result.quiet_fraction < 0.7
    assert result.median_ms == pytest.approx(1.0) and result.p90_ms == pytest.approx(1.0)


def test_when_the_wait_runs_out_a_hundred_undisturbed_samples_still_make_the_measurement(
        tmp_path: Path) -> None:
    # undisturbed only for the first 0.4 s (~250 samples of 1.0 ms after the warm-up), then
    # 1.6x slower (probe 16 us) past the 1 s wait: the undisturbed samples are the
    # measurement, unscaled
    clock = FakeClock([])
    probe = clock.probe(tmp_path)
    start = clock.now

    def durations():
        while True:
            disturbed = clock.now - start > 0.4
            clock.probe_s[0] = 16e-6 if disturbed else 10e-6
            yield 0.0016 if disturbed else 0.001

    clock.durations = durations()
    result = _measure_cpu(clock.model, None, warmup=100, samples=500, batch=1, threads=1,
                          quiet_wait_s=1.0, clock=clock, probe=probe)
    assert not result.disturbed and 100 <= result.samples < 500
    assert result.median_ms == pytest.approx(1.0)
    assert clock.now >= 1.0


def test_a_slow_models_noisy_windows_are_not_filtered_down_to_the_fast_ones(
        tmp_path: Path) -> None:
    # 1.5 ms calls with +-15% noise: a 5 ms window holds 3-4 samples, so window medians
    # scatter by several percent; keeping only those within 5% of the fastest would report a
    # median well below the model's. The tolerance widens with the medians' standard error.
    import random

    rng = random.Random(0)
    clock = FakeClock(rng.uniform(0.00128, 0.00172) for _ in itertools.count())
    result = _measure_cpu(clock.model, None, warmup=100, samples=500, batch=1, threads=1,
                          clock=clock, probe=clock.probe(tmp_path))
    assert not result.disturbed and result.quiet_fraction > 0.9
    assert result.median_ms == pytest.approx(1.5, rel=0.02)


def test_a_model_slower_than_a_window_is_not_filtered_down_to_its_fast_calls(
        tmp_path: Path) -> None:
    # 6 ms calls +-15%: one sample per 5 ms window, so a window's median is one call
    import random

    rng = random.Random(1)
    clock = FakeClock(rng.uniform(0.0051, 0.0069) for _ in itertools.count())
    result = _measure_cpu(clock.model, None, warmup=20, samples=300, batch=1, threads=1,
                          clock=clock, probe=clock.probe(tmp_path))
    assert not result.disturbed and result.quiet_fraction > 0.9
    assert result.median_ms == pytest.approx(6.0, rel=0.02)
