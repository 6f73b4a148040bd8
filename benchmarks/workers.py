"""Trials per hour with 1 and with 2 local workers on the same machine (issue 5).

    python benchmarks/workers.py [--trials 40] [--experiment experiments/digits_mlp.toml]

Each configuration is a fresh run folder; throughput counts the trials that started after
every worker was running (worker processes take seconds to start; the teacher, trained once
per run, is left out) until the last trial's end, the enqueued baselines and starting recipes
left out (they are not the search's usual trials).

--ceiling also measures what the machine itself allows: the same fixed training job (the
task's teacher architecture, 1 thread) alone and as two processes at once, and alone on 2
threads (what one worker does). Two workers cannot beat two such jobs at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from optuna.trial import TrialState

from slimsearch.experiment import load_experiment
from slimsearch.run import load_study

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


def training_job(task_name: str, threads: int, steps: int) -> float:
    """Seconds that ``steps`` training steps (batch 64) of the task's teacher take here."""
    import torch

    from slimsearch.tasks import make_task

    torch.set_num_threads(threads)
    task = make_task(task_name, seed=0)
    torch.manual_seed(0)
    model = task.make_model(**task.teacher_kwargs).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = task.train.x, task.train.y
    start = time.perf_counter()
    for step in range(steps):
        i = (step * 64) % (len(x) - 64)
        loss = torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def ceiling(task_name: str, steps: int, rounds: int = 3) -> None:
    """Jobs per hour: 1 process on 1 and on 2 threads, and 2 single-thread processes at once."""
    def run(threads: int, copies: int) -> float:
        """Jobs per hour of ``copies`` processes started together, from each one's own
        training time (process start-up and imports left out, as a worker pays them once)."""
        command = [sys.executable, __file__, "--job", task_name, "--threads", str(threads),
                   "--steps", str(steps)]
        children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
                    for _ in range(copies)]
        return sum(3600 / json.loads(child.communicate()[0]) for child in children)

    alone1, alone2, pair = [], [], []
    for _ in range(rounds):  # interleaved, so the machine's slow periods hit all three alike
        alone1.append(run(1, 1))
        alone2.append(run(2, 1))
        pair.append(run(1, 2))
    a1, a2, p = (statistics.median(v) for v in (alone1, alone2, pair))
    print(f"ceiling, {task_name} training job of {steps} steps, jobs/h (median of {rounds}): "
          f"1 process 1 thread {a1:.0f}, 1 process 2 threads {a2:.0f}, 2 processes at once "
          f"{p:.0f}: 2 at once = {p / a1:.2f}x one on 1 thread, {p / a2:.2f}x one on 2 threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--experiment", type=Path, default=ROOT / "experiments" / "digits_mlp.toml")
    parser.add_argument("--ceiling", action="store_true",
                        help="also measure the machine's own limit for two jobs at once")
    parser.add_argument("--ceiling-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3000, help="training steps per ceiling job")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # a ceiling job's own process
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(training_job(args.job, args.threads, args.steps)))
        return
    if args.ceiling or args.ceiling_only:
        ceiling(load_experiment(args.experiment).task, args.steps)
        if args.ceiling_only:
            return
    one, n1 = throughput(args.experiment, args.trials, 1)
    two, n2 = throughput(args.experiment, args.trials, 2)
    print(f"{args.experiment.name}, {args.trials} trials: 1 worker {one:.0f} trials/h "
          f"({n1} complete), 2 workers {two:.0f} trials/h ({n2} complete): {two / one:.2f}x")


if __name__ == "__main__":
    main()
