"""Trials per hour with 1 and with 2 local workers on the same machine (issue 5).

    python benchmarks/workers.py [--trials 40] [--experiment experiments/digits_mlp.toml]

Each configuration is a fresh run folder; throughput counts the trials that started after
every worker was running (worker processes take seconds to start; the teacher, trained once
per run, is left out) until the last trial's end, the enqueued baselines and starting recipes
left out (they are not the search's usual trials).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from optuna.trial import TrialState

from slimsearch.report.data import load_study

ROOT = Path(__file__).resolve().parents[1]


def throughput(experiment: Path, trials: int, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        subprocess.run([sys.executable, "-m", "slimsearch", "run", str(experiment), "--trials",
                        str(trials), "--run-dir", str(run_dir), "--workers", str(workers)],
                       check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        done = [t for t in load_study(run_dir).get_trials(deepcopy=False)
                if t.state == TrialState.COMPLETE]
        # From the moment every worker runs trials (a worker process takes a few seconds to
        # start) to the last trial's end: the steady state an overnight run lives in. The
        # enqueued trials (baselines, the pre-pass's starting recipes) come first and differ
        # from sampled ones (no distillation, cached latencies): left out of both runs, so
        # that 1 and 2 workers are compared on the same kind of trials.
        owners = {t.user_attrs["owner"]["pid"] for t in done}
        sampled = [t for t in done if not {"baseline", "start"} & set(t.user_attrs)]
        start = max([min(t.datetime_start for t in done if t.user_attrs["owner"]["pid"] == pid)
                     for pid in owners] + [min(t.datetime_start for t in sampled)])
        end = max(t.datetime_complete for t in done)
        counted = [t for t in sampled if t.datetime_start >= start]
        return len(counted) / (end - start).total_seconds() * 3600, len(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--experiment", type=Path, default=ROOT / "experiments" / "digits_mlp.toml")
    args = parser.parse_args()
    one, n1 = throughput(args.experiment, args.trials, 1)
    two, n2 = throughput(args.experiment, args.trials, 2)
    print(f"{args.experiment.name}, {args.trials} trials: 1 worker {one:.0f} trials/h "
          f"({n1} complete), 2 workers {two:.0f} trials/h ({n2} complete): {two / one:.2f}x")


if __name__ == "__main__":
    main()
