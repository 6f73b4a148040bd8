"""Does the search beat random? Hypervolume after N trials, sampler "auto" vs "random" (issue 5).

    python benchmarks/sampler_efficiency.py [--seeds 10] [--auto-trials 100] [--random-trials 150]

Each seed runs the experiment (default experiments/digits_mlp.toml) twice in fresh folders:
with sampler "auto" and with "random". The hypervolume of the completed trials is computed in
the space (1 - val_accuracy, size / teacher size, latency / teacher latency), all minimised,
against the reference point (1 - (teacher val_accuracy - 0.2), 1.0, 2.0): trials more than 20
points less accurate, larger than the teacher or over twice its latency add nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

from optuna.trial import TrialState

from slimsearch.experiment import load_experiment
from slimsearch.report.data import load_report_data, load_study
from slimsearch.report.pareto import hypervolume
from slimsearch.search import prepare, run_search

ROOT = Path(__file__).resolve().parents[1]


def history(experiment: Path, *, seed: int, sampler: str, trials: int,
            checkpoints: list[int]) -> dict[int, float]:
    config = load_experiment(experiment)
    config = config.with_overrides(seed=seed, search=dataclasses.replace(
        config.search, trials=trials, sampler=sampler))
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        run_search(prepare(config, run_dir=run_dir, storage_url=None), experiment,
                   trials=trials, timeout_s=None, say=lambda _line: None)
        teacher = load_report_data(run_dir).teacher
        done = sorted((t for t in load_study(run_dir).get_trials(deepcopy=False)
                       if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    ref = (1 - (teacher["val_accuracy"] - 0.2), 1.0, 2.0)
    points = [(1 - t.values[0], t.values[1] / teacher["size_bytes"],
               t.values[2] / teacher["latency_ms"]) for t in done]
    return {n: hypervolume(points[:n], ref) for n in checkpoints}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--auto-trials", type=int, default=100)
    parser.add_argument("--random-trials", type=int, default=150)
    parser.add_argument("--experiment", type=Path, default=ROOT / "experiments" / "digits_mlp.toml")
    args = parser.parse_args()
    early = args.auto_trials // 2
    rows = []
    for seed in range(args.seeds):
        auto = history(args.experiment, seed=seed, sampler="auto", trials=args.auto_trials,
                       checkpoints=[early, args.auto_trials])
        rand = history(args.experiment, seed=seed, sampler="random", trials=args.random_trials,
                       checkpoints=[args.auto_trials, args.random_trials])
        rows.append((auto, rand))
        print(f"seed {seed}: auto@{early} {auto[early]:.4f}  auto@{args.auto_trials} "
              f"{auto[args.auto_trials]:.4f} | random@{args.auto_trials} "
              f"{rand[args.auto_trials]:.4f}  random@{args.random_trials} "
              f"{rand[args.random_trials]:.4f}", flush=True)
    mean_auto_early = statistics.fmean(a[early] for a, _ in rows)
    mean_random_late = statistics.fmean(r[args.random_trials] for _, r in rows)
    wins = sum(a[args.auto_trials] > r[args.auto_trials] for a, r in rows)
    print(f"mean hypervolume: auto after {early} trials {mean_auto_early:.4f} vs random after "
          f"{args.random_trials} {mean_random_late:.4f} "
          f"({'>=' if mean_auto_early >= mean_random_late else '<'}); auto beats random at "
          f"{args.auto_trials} trials in {wins} of {len(rows)} seeds")


if __name__ == "__main__":
    main()
