"""Latency: enough warm-up and samples, a sane summary, threads put back, and more work is slower."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimsearch.evaluators import Latency, LatencyCache, measure_latency
from slimsearch.timing.latency import _steadiest, rested_latency


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
    # at rest: 6 bursts of at least 20 samples each, after a warm-up of at least 3 calls
    assert result.samples >= 6 * 20 and result.attempts == 6
    assert result.warmup_calls >= 3
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


def _tiny_mlp_executable(tmp_path: Path, target):
    """(task, float model, its torch executable) of a small digits-mlp student."""
    from slimsearch.compression import MODEL_FILE, CompressedModel, save_artifact
    from slimsearch.runtimes import RUNTIMES
    from slimsearch.tasks import factory_path, make_task
    from slimsearch.tasks.digits import digits_mlp

    task = make_task("digits-mlp", seed=0)
    model = digits_mlp(width=0.25, depth=1)
    path = save_artifact(CompressedModel(model=model, factory=factory_path(digits_mlp),
                                         kwargs={"width": 0.25, "depth": 1}), tmp_path / MODEL_FILE)
    executable = RUNTIMES["torch"].materialize(path, target=target, device=torch.device("cpu"),
                                               out_dir=tmp_path, example=task.example_inputs(1))
    return task, model, executable


def test_the_evaluator_measures_an_executed_form_once_per_batch(tmp_path: Path) -> None:
    from slimsearch.evaluators import EvalContext, LatencyEvaluator
    from slimsearch.experiment import TargetConfig

    target = TargetConfig(device="cpu", batch_sizes=(1, 8))
    cpu = torch.device("cpu")
    task, model, executable = _tiny_mlp_executable(tmp_path, target)
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


def test_reported_batch_sizes_are_timed_to_a_looser_interval_than_the_objective(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The objective's ratio is timed to paired.PRECISION; the other batch sizes, reported
    only, to REPORTED_PRECISION, and trusted within it (their figures say so)."""
    from slimsearch.evaluators import EvalContext, LatencyEvaluator, _base
    from slimsearch.evaluators._base import REPORTED_PRECISION, Reference
    from slimsearch.experiment import TargetConfig
    from slimsearch.timing import paired

    target = TargetConfig(device="cpu", batch_sizes=(8, 1))
    cpu = torch.device("cpu")
    task, model, executable = _tiny_mlp_executable(tmp_path, target)
    asked: dict[int, dict] = {}

    def spy(*args, batch_size: int, **protocol):
        asked[batch_size] = protocol
        return paired.paired_latency(*args, batch_size=batch_size, **protocol)

    monkeypatch.setattr(_base, "paired_latency", spy)
    reference = Reference(executable, anchor_ms={8: 0.05, 1: 0.02}, batch={8: 8, 1: 1})
    context = EvalContext(task=task, executable=executable, model=model, target=target,
                          device=cpu, latency_cache=None, reference=reference)
    metrics = LatencyEvaluator()(context)
    assert "precision" not in asked[8] and "trusted" not in asked[8]  # paired's defaults
    assert asked[1]["precision"] == asked[1]["trusted"] == REPORTED_PRECISION
    assert REPORTED_PRECISION > paired.PRECISION
    assert metrics["latency_b1_window_cv"] <= REPORTED_PRECISION or metrics["latency_b1_unstable"]


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


class _FakeClock:
    """A clock that only moves when a timed form "runs": the decision rules are tested on
    the durations they are given, not on how closely ``time.sleep`` keeps to them on a busy
    machine (a sleep of 1.7 ms once read above 0.95 of a 2 ms one in a full suite, and the
    comparison then rightly ran all its rounds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def form(self, seconds: Any, counter: dict[str, int] | None = None, name: str = ""):
        durations = iter(seconds) if not isinstance(seconds, float) else None

        def call(_x: object) -> None:
            if counter is not None:
                counter[name] += 1
            self.now += next(durations) if durations is not None else seconds
        return call


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> _FakeClock:
    import types

    from slimsearch.timing import latency
    clock = _FakeClock()
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    return clock


def first_form_calls(rounds: int) -> int:
    """The first form's calls over ``rounds`` rounds of compare_latency with no warm-up: an
    untimed call and a timed one, but only the timed one where it ran just before (the order
    goes forth and back, so every even round after the first starts where the last ended)."""
    return 2 + sum(2 if r % 2 else 1 for r in range(1, rounds))


@pytest.mark.parametrize(("int8_s", "rounds_run"), [(0.0005, 2), (0.0017, 3)])
def test_a_clear_choice_stops_the_comparison_early(fake_clock: _FakeClock, int8_s: float,
                                                   rounds_run: int) -> None:
    # int8 at 1/4 of float ends the timing after two rounds, int8 at 0.85 after the third (of
    # at most 10), though a mixed form hovers at 0.98 of float: it is beaten by int8 anyway.
    from slimsearch.timing.latency import compare_latency

    rounds = {"float": 0, "mixed": 0, "int8": 0}
    timed = compare_latency({"float": fake_clock.form(0.002, rounds, "float"),
                             "mixed": fake_clock.form(0.00196, rounds, "mixed"),
                             "int8": fake_clock.form(int8_s, rounds, "int8")},
                            None, rounds=10, window_s=0.0, warmup_s=0.0, decided_at=0.95)
    assert timed["int8"] == pytest.approx(int8_s / 0.002 * timed["float"])
    assert rounds["float"] == first_form_calls(rounds_run)


def test_a_choice_that_is_clear_only_in_some_rounds_runs_to_the_end(fake_clock: _FakeClock) -> None:
    # int8 reads 0.85 of float in every round but the second, where it reads 1.0 (a
    # disturbance): not "below in every round", so the comparison does not stop early
    from slimsearch.timing.latency import compare_latency

    rounds = {"float": 0}
    int8 = [0.0017, 0.0017, 0.002] + [0.0017] * 40  # round 1: untimed, timed; round 2: timed
    timed = compare_latency({"float": fake_clock.form(0.002, rounds, "float"),
                             "int8": fake_clock.form(int8)},
                            None, rounds=10, window_s=0.0, warmup_s=0.0, decided_at=0.95)
    assert rounds["float"] == first_form_calls(10)
    assert timed["int8"] == pytest.approx(0.85 * timed["float"])


def test_a_near_tie_is_timed_to_the_last_round(fake_clock: _FakeClock) -> None:
    # neither clearly faster nor clearly not: every round runs, and the median decides
    from slimsearch.timing.latency import compare_latency

    rounds = {"float": 0}
    timed = compare_latency({"float": fake_clock.form(0.002, rounds, "float"),
                             "int8": fake_clock.form([0.002, 0.002, 0.0018, 0.0018] * 50)},
                            None, rounds=6, window_s=0.0, warmup_s=0.0, decided_at=0.95)
    assert rounds["float"] == first_form_calls(6)
    assert 0.85 < timed["int8"] / timed["float"] < 1.05


def test_short_calls_are_grouped_so_a_sample_outlasts_the_clock_resolution() -> None:
    # 10 us per call: ceil(25 us / 10 us) = 3 calls per sample, latency reported per call
    now = [0.0]

    def call(_x: object) -> None:
        now[0] += 10e-6

    result = rested_latency(call, torch.zeros(1, 2), clock=lambda: now[0],
                            sleep=lambda s: None)
    assert result.calls_per_sample == 3
    assert result.median_ms == pytest.approx(0.01) and result.cv == pytest.approx(0, abs=1e-9)


def test_a_figure_recorded_by_the_probe_protocol_still_loads() -> None:
    # latency_cache.json of a run from before the ratio holds the probe's fields
    old = {**_latency(0.05).__dict__, "disturbed": True, "quiet_fraction": 0.3,
           "probe": "conv"}
    assert Latency.from_dict(old) == _latency(0.05)


def test_a_measuring_process_pins_the_allocator() -> None:
    # glibc's default thresholds made the same model run at 44 or 60 ms by heap state
    import platform

    from slimsearch.timing.latency import pin_allocator

    described = pin_allocator()
    if platform.libc_ver()[0] == "glibc":
        assert described == "glibc, mmap threshold 32 MB, trim threshold 64 MB"
    assert pin_allocator() is described  # once per process
