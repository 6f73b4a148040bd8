"""What measuring costs in a search: where each trial's time goes (issue 16, part 4).

    python benchmarks/measurement_cost.py [--experiment experiments/digits_cnn.toml]
        [--trials 50] [--batch-sizes 256 1] [--out DIR]

Runs the experiment's search (its latency batch sizes replaced by --batch-sizes) in a fresh
run folder and prints, from each completed trial's record ("seconds"), the share of trial
time spent training and compressing, on accuracy, on the int8 plan's timings, on latency
measurement and on the rest (materializing, writing files); then how the latency figures
were got: paired rounds and attempts per measurement, unstable figures, cache hits. The
teacher's own training and measurement are not trial time and are printed apart, and so is
the confirmation pass that ``slimsearch run`` ends with (it times the front again, and at the
batch sizes after the first, which trials are not timed at).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from slimsearch.atomic import read_json
from slimsearch.confirm import confirm_front
from slimsearch.evaluators import metric_suffix
from slimsearch.experiment import load_experiment
from slimsearch.report.data import load_report_data
from slimsearch.search import prepare, run_search

ROOT = Path(__file__).resolve().parents[1]


def search(experiment: Path, trials: int, batch_sizes: list[int], run_dir: Path,
           sampler: str | None = None) -> tuple[float, float]:
    """Run the search into ``run_dir``, then the confirmation pass, as ``slimsearch run``
    does; the wall-clock seconds of each (the search's with the teacher)."""
    config = load_experiment(experiment)
    config = dataclasses.replace(config, target=dataclasses.replace(
        config.target, batch_sizes=tuple(batch_sizes)))
    if sampler:
        config = dataclasses.replace(config, search=dataclasses.replace(config.search,
                                                                        sampler=sampler))
    prepared = prepare(config, run_dir=run_dir, storage_url=None)
    start = time.perf_counter()
    run_search(prepared, experiment, trials=trials, timeout_s=None, say=lambda _line: None)
    searched = time.perf_counter()
    confirm_front(run_dir, say=lambda _line: None)
    return searched - start, time.perf_counter() - searched


def breakdown(run_dir: Path, batch_sizes: list[int]) -> dict[str, float]:
    """Print where the trials' time went; the shares (fractions of trial time)."""
    data = load_report_data(run_dir)
    trials = data.completed
    wall = sum(t.seconds for t in trials)
    parts = {"training+compressing": 0.0, "accuracy": 0.0, "int8 plan": 0.0,
             "latency": 0.0}
    for t in trials:
        s = t.metrics["seconds"]
        parts["training+compressing"] += s["build"]
        parts["accuracy"] += s["val_accuracy"] + s["test_accuracy"]
        parts["int8 plan"] += s["plan"]
        parts["latency"] += s["latency_ms"]
    parts["the rest"] = wall - sum(parts.values())
    print(f"{len(trials)} completed trials, {wall:.0f} s of trial time "
          f"({wall / len(trials):.1f} s per trial)")
    print("  " + ", ".join(f"{name} {value:.0f} s ({value / wall:.1%})"
                           for name, value in parts.items()))
    measuring = parts["int8 plan"] + parts["latency"]
    print(f"  latency measurement + the plan's timings: {measuring:.0f} s, "
          f"{measuring / wall:.1%} of trial time")
    for position, batch in enumerate(batch_sizes):
        suffix = metric_suffix(position, batch)
        timed = [t for t in trials if f"latency{suffix}_ms" in t.metrics]
        if not timed:
            print(f"  batch {batch}: reported, not timed in trials (the confirmation pass "
                  "times the front there)")
            continue
        measured = [t.metrics for t in timed if not t.metrics.get(f"latency{suffix}_cached")]
        rounds = [m[f"latency{suffix}_rounds"] for m in measured]
        attempts = [m[f"latency{suffix}_attempts"] for m in measured]
        unstable = sum(bool(t.metrics.get(f"latency{suffix}_unstable")) for t in timed)
        print(f"  batch {batch}: measured {len(measured)}, cached "
              f"{len(timed) - len(measured)}, rounds median "
              f"{statistics.median(rounds) if rounds else 0:.0f} (max "
              f"{max(rounds, default=0)}), attempts > 1: {sum(a > 1 for a in attempts)}, "
              f"unstable {unstable}")
    teacher = data.teacher or {}
    if "seconds" in teacher:
        print(f"  teacher (not trial time): {teacher['seconds']}")
    return {name: value / wall for name, value in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path,
                        default=ROOT / "experiments" / "digits_cnn.toml")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1])
    parser.add_argument("--sampler", help="instead of the experiment's (random: the same "
                                          "recipes in every run, for comparing two versions)")
    parser.add_argument("--out", type=Path, help="run folder to create (default: a temporary "
                                                 "one, removed at the end)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.out or Path(scratch) / "run"
        seconds, confirming = search(args.experiment, args.trials, args.batch_sizes, run_dir,
                                     args.sampler)
        print(f"{args.experiment.name}, {args.trials} trials, batch sizes "
              f"{args.batch_sizes}: {seconds:.0f} s in all (teacher included)")
        breakdown(run_dir, args.batch_sizes)
        front = read_json(run_dir / "confirmed.json")["trials"]
        print(f"  confirmation pass (not trial time): {confirming:.0f} s for {len(front)} "
              f"Pareto trials, {confirming / seconds:.1%} of the search's time")


if __name__ == "__main__":
    main()
