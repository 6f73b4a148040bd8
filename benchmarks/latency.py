"""Is the latency protocol repeatable, and what does it cost? (issue 4)

    python benchmarks/latency.py [--repeats 20] [--processes 5] [--trials 30] [--quiet-wait S]

1. Repeatability: the teacher models of digits-mlp and digits-cnn at batch 1 (1 thread),
   measured with the target's default protocol (``TargetConfig()``), --repeats times in this
   process (0.2 s apart, as a search spaces them) and once in each of --processes fresh
   processes. Prints every result, the CV of each group of 5 consecutive in-process results
   and of the fresh-process results, and, for comparison, the CV of the plain medians of the
   same samples (every sample, whatever the machine was doing: the protocol without the probe).
2. Cost: a --trials digits-mlp search (experiments/digits_mlp.toml) in a temporary folder:
   the share of trial time spent measuring latency (the int8 plan's timings included) and on
   bookkeeping (everything but training/compressing and accuracy), from each trial's record,
   and the mean milliseconds per trial of each recorded step. ``--repeats 0 --processes 0``
   runs only this part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from slimsearch.evaluators import measure_latency
from slimsearch.experiment import TargetConfig, load_experiment
from slimsearch.run.folder import RunFolder
from slimsearch.search import prepare, run_search
from slimsearch.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


def measure_once(name: str, quiet_wait_s: float | None = None) -> dict[str, float]:
    """One measurement of ``name``'s teacher architecture at batch 1, with the defaults
    (``quiet_wait_s`` other than the default, if given)."""
    target = TargetConfig()
    if quiet_wait_s is not None:
        target = dataclasses.replace(target, quiet_wait_s=quiet_wait_s)
    task = make_task(name, seed=0)
    torch.manual_seed(0)
    model = task.make_model(**task.teacher_kwargs).eval()
    start = time.perf_counter()
    result = measure_latency(model, task.example_inputs(1), device=torch.device("cpu"),
                             threads=target.threads, max_cv=target.max_cv,
                             max_repeats=target.max_repeats, quiet_wait_s=target.quiet_wait_s)
    return {"us": result.median_ms * 1e3, "raw_us": result.raw_median_ms * 1e3,
            "disturbed": result.disturbed, "quiet_fraction": result.quiet_fraction,
            "samples": result.samples, "seconds": time.perf_counter() - start}


def describe(label: str, runs: list[dict[str, float]]) -> None:
    us = [r["us"] for r in runs]
    raw = [r["raw_us"] for r in runs]
    groups = [us[i:i + 5] for i in range(0, len(us) - 4, 5)]
    print(f"  {label}, {len(us)} measurements (us): {' '.join(f'{u:.1f}' for u in us)}")
    print(f"    CV of each 5: {' '.join(f'{cv(g):.2%}' for g in groups)} | all: {cv(us):.2%} | "
          f"plain medians of the same samples: CV {cv(raw):.2%} ({min(raw):.1f}-{max(raw):.1f} "
          f"us) | scaled (too few undisturbed samples) {sum(r['disturbed'] for r in runs)}/"
          f"{len(runs)} | mean quiet fraction "
          f"{statistics.fmean(r['quiet_fraction'] for r in runs):.2f} | "
          f"{statistics.fmean(r['seconds'] for r in runs):.2f} s per measurement (max "
          f"{max(r['seconds'] for r in runs):.2f})")


def repeatability(repeats: int, processes: int, quiet_wait_s: float | None) -> None:
    wait = TargetConfig().quiet_wait_s if quiet_wait_s is None else quiet_wait_s
    print(f"repeatability at batch 1, 1 thread, quiet_wait_s {wait}:")
    for name in ("digits-mlp", "digits-cnn"):
        print(name)
        in_process = []
        for _ in range(repeats):
            time.sleep(0.2)
            in_process.append(measure_once(name, quiet_wait_s))
        if in_process:
            describe("in this process", in_process)
        if not processes:
            continue
        fresh = [json.loads(subprocess.run(
            [sys.executable, __file__, "--one", name, "--quiet-wait", str(wait)], check=True,
            capture_output=True, text=True).stdout) for _ in range(processes)]
        describe("one per fresh process", fresh)


def cost(trials: int) -> None:
    from slimsearch.report.data import load_report_data

    config = load_experiment(ROOT / "experiments" / "digits_mlp.toml")
    with tempfile.TemporaryDirectory() as folder:
        prepared = prepare(config, run_dir=Path(folder) / "run", storage_url=None)
        start = time.perf_counter()
        run_search(prepared, ROOT / "experiments" / "digits_mlp.toml", trials=trials,
                   timeout_s=None, say=lambda _line: None)
        total = time.perf_counter() - start
        data = load_report_data(RunFolder(Path(folder) / "run").root)
        wall = build = accuracy = plan = latency = 0.0
        parts: dict[str, list[float]] = {}
        for t in data.completed:
            s = t.metrics["seconds"]
            for key, value in s.items():
                parts.setdefault(key, []).append(value)
            wall += t.seconds
            build += s["build"]
            accuracy += s["val_accuracy"] + s["test_accuracy"]
            plan += s["plan"]
            latency += s["latency_ms"]
        reused, figures = data.latency_cache
    other = wall - build - accuracy - latency - plan
    latency += plan
    print(f"{trials}-trial digits-mlp search: {total:.1f} s in all (teacher included), "
          f"{wall:.1f} s of trial time")
    print(f"  training+compressing {build / wall:.1%}, accuracy {accuracy / wall:.1%}, "
          f"latency measurement {latency / wall:.1%} (the int8 plan's timings "
          f"{plan / wall:.1%}), bookkeeping {other / wall:.1%}; "
          f"latency + bookkeeping {(latency + other) / wall:.1%}; latency cache reused "
          f"{reused}/{figures}")
    print("  ms per trial: trial " + f"{wall / len(data.completed) * 1e3:.0f}, " + ", ".join(
        f"{key} {statistics.fmean(values) * 1e3:.0f}" for key, values in parts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--quiet-wait", type=float,
                        help="target.quiet_wait_s for the repeatability part (default: the "
                             "target's default; the cost part always uses the experiment's)")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a fresh process's one measurement
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_once(args.one, args.quiet_wait)))
        return
    if args.repeats or args.processes:
        repeatability(args.repeats, args.processes, args.quiet_wait)
    if not args.skip_cost:
        cost(args.trials)


if __name__ == "__main__":
    main()
