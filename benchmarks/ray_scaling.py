"""Trials per hour on this machine: the local backend (1 and 2 workers) against the Ray
backend (1 and 2 trials at once), and what Ray adds to each trial (issue 7).

    python benchmarks/ray_scaling.py [--trials 30] [--experiments digits_mlp,digits_cnn]

Each configuration is a fresh run folder, run one after another (never two at once: they
would share the cores) by ``slimsearch run`` in a subprocess, the sensitivity pre-pass off so
that every configuration runs the same kind of trials from the first. Throughput counts the
trials that started after each slot (worker or Ray trial) had finished its first trial
(processes, Ray's included, take seconds to start; the teacher, trained once per run, is left
out) until the last trial's end, from the study's own start and end times. Ray's overhead per
trial is the difference of the seconds per trial of Ray with 1 trial at once and of the local
backend with 1 worker, measured in the same invocation.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from optuna.trial import TrialState

from slimsearch.run import load_study

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))


def throughput(experiment: Path, trials: int, backend: str, slots: int) -> tuple[float, int]:
    """(trials per hour in the steady state, completed trials) of one fresh run."""
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        plain = Path(folder) / experiment.name  # the same experiment without the pre-pass
        text = experiment.read_text()
        plain.write_text(text.replace("[search]", "[search]\nsensitivity = false", 1)
                         if "[search]" in text else text + "\n[search]\nsensitivity = false\n")
        subprocess.run([sys.executable, "-m", "slimsearch", "run", str(plain), "--trials",
                        str(trials), "--run-dir", str(run_dir), "--workers", str(slots),
                        "--backend", backend], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, cwd=ROOT)
        done = sorted((t for t in load_study(run_dir).get_trials(deepcopy=False)
                       if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_start)
        # each slot's first trial ends after its process started: steady state from then
        first_ends = sorted(t.datetime_complete for t in done)[:slots]
        start = max(first_ends)
        counted = [t for t in done if t.datetime_start >= start]
        end = max(t.datetime_complete for t in done)
        return len(counted) / (end - start).total_seconds() * 3600, len(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--experiments", default="digits_mlp,digits_cnn")
    args = parser.parse_args()
    for name in args.experiments.split(","):
        experiment = ROOT / "experiments" / f"{name}.toml"
        rates = {}
        for backend, slots in CONFIGS:
            rates[backend, slots], complete = throughput(experiment, args.trials, backend, slots)
            print(f"{name}: {backend} x{slots}: {rates[backend, slots]:.0f} trials/h "
                  f"({complete} of {args.trials} complete)", flush=True)
        overhead = 3600 / rates["ray", 1] - 3600 / rates["local", 1]
        print(f"{name}: 2 at once vs 1: local {rates['local', 2] / rates['local', 1]:.2f}x, "
              f"ray {rates['ray', 2] / rates['ray', 1]:.2f}x; ray vs local with 1: "
              f"{rates['ray', 1] / rates['local', 1]:.2f}x; Ray adds {overhead:+.2f} s per trial "
              f"({3600 / rates['local', 1]:.2f} s -> {3600 / rates['ray', 1]:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
