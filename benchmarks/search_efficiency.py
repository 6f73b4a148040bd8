"""Does the default search beat random sampling, and by how many trials? (issue 5)

    python benchmarks/search_efficiency.py [--seeds 10] [--trials 100] [--random-trials 150]
                                           [--jobs 2] [--quick]
    python benchmarks/search_efficiency.py --from-json benchmarks/search_efficiency.json

For each seed, three searches of the experiment (default experiments/digits_cnn.toml; the
digits-mlp front saturates within a few dozen trials, so one validation sample moves its
hypervolume more than the sampler does) in fresh folders, all from the same teacher:

    auto           sampler "auto" with the sensitivity pre-pass (the defaults)
    auto-no-pass   sampler "auto" without it
    random         random sampling (no pre-pass)

Hypervolume after n trials, in a fixed box relative to the teacher: the validation accuracy
drop, clipped at 0 and divided by 0.15 (15 points, the box's edge), and the file size as a
fraction of the teacher's; reference point (1, 1). Latency is left out on purpose: on this
machine its noise moves a hypervolume more than the samplers do. Printed: the mean at 25, 50,
100 and 150 trials per arm; how many trials random needs to match each arm's mean at 50;
same-seed wins of each arm over random at 100 trials with a one-sided sign test. Writes the
curves to --out (JSON) and, where Chromium is installed, a plot beside it (PNG); --from-json
prints the summary and redraws the plot of an earlier run without searching again.

--quick trains less per trial (distillation 4 epochs, fine-tuning and QAT 1) so that the
whole benchmark fits in hours rather than a day; say so when you quote it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"auto": ("auto", True), "auto-no-pass": ("auto", False), "random": ("random", False)}
CHECKPOINTS = (25, 50, 100, 150)
BOX_POINTS = 0.15


def curve(run_dir: Path, teacher: dict) -> list[float]:
    """Hypervolume after each trial (1, 2, ... in trial order; failed trials add nothing)."""
    from slimsearch.report.pareto import hypervolume
    from slimsearch.run import load_study

    points, out = [], []
    for t in sorted(load_study(run_dir).get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == TrialState.COMPLETE:
            drop = max(0.0, teacher["val_accuracy"] - t.values[0])
            points.append((drop / BOX_POINTS, t.values[1] / teacher["size_bytes"]))
        out.append(hypervolume(points, (1.0, 1.0)))
    return out


def one_search(experiment: str, seed: int, arm: str, trials: int, quick: bool,
               teacher_cache: str) -> list[float]:
    import torch

    from slimsearch.atomic import read_json
    from slimsearch.experiment import load_experiment
    from slimsearch.search import prepare, run_search

    torch.set_num_threads(1)
    config = load_experiment(experiment)
    sampler, pre_pass = ARMS[arm]
    config = config.with_overrides(seed=seed, search=dataclasses.replace(
        config.search, trials=trials, sampler=sampler, sensitivity=pre_pass))
    if quick:
        config = config.with_overrides(train=dataclasses.replace(
            config.train, distill_epochs=4, finetune_epochs=1, qat_epochs=1))
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        cached = Path(teacher_cache) / f"seed{seed}"
        if cached.is_dir():  # the same teacher for every arm of a seed
            shutil.copytree(cached, run_dir / "teacher")
        run_search(prepare(config, run_dir=run_dir, storage_url=None), Path(experiment),
                   trials=trials, timeout_s=None, say=lambda _line: None)
        if not cached.is_dir():
            shutil.copytree(run_dir / "teacher", cached, dirs_exist_ok=True)
        return curve(run_dir, read_json(run_dir / "teacher" / "metrics.json"))


def trials_to_match(target: float, mean_curve: list[float]) -> str:
    n = next((i + 1 for i, hv in enumerate(mean_curve) if hv >= target), None)
    return str(n) if n is not None else f">{len(mean_curve)}"


def sign_test(wins: int, n: int) -> float:
    """One-sided p-value of at least ``wins`` of ``n`` if either side were as likely."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def plot(mean_curves: dict[str, list[float]], path: Path) -> None:
    """A PNG of the mean curves, drawn by plotly and photographed by headless Chromium."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return
    import plotly.graph_objects as go

    fig = go.Figure([go.Scatter(x=list(range(1, len(c) + 1)), y=c, name=arm, mode="lines")
                     for arm, c in mean_curves.items()])
    # from trial 10 on: the first few trials (baselines) would squash the curves that matter
    low = min(c[min(9, len(c) - 1)] for c in mean_curves.values())
    fig.update_layout(width=760, height=420, xaxis_title="trials",
                      yaxis_title="mean hypervolume (accuracy drop x size)",
                      yaxis_range=[max(0.0, low - 0.02), 1.0],
                      title="Search efficiency on the same seeds")
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "plot.html"
        fig.write_html(page, include_plotlyjs=True, full_html=True,
                       config={"displayModeBar": False})
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--no-first-run",
                        f"--user-data-dir={folder}/profile", "--window-size=800,460",
                        "--virtual-time-budget=5000", f"--screenshot={path.resolve()}",
                        page.as_uri()], capture_output=True, timeout=120)


def summarize(curves: dict[str, dict], seeds: int, trials: int, experiment: str,
              quick: bool) -> dict[str, list[float]]:
    """Print the table and the same-seed comparison; return the mean curve of each arm."""
    arms = list(curves)
    mean = {arm: [statistics.fmean(c[i] for c in curves[arm].values())
                  for i in range(min(len(c) for c in curves[arm].values()))] for arm in arms}
    length = max(len(c) for c in mean.values())
    checkpoints = [c for c in CHECKPOINTS if c <= length]
    print(f"{seeds} seeds, {trials} trials, {experiment}"
          f"{' (--quick)' if quick else ''}; mean hypervolume after n trials:")
    print(f"{'arm':<14}" + "".join(f"{f'n={c}':>10}" for c in checkpoints)
          + "   random needs to match its mean at 50")
    for arm in arms:
        match = (trials_to_match(mean[arm][49], mean["random"])
                 if "random" in mean and len(mean[arm]) >= 50 else "-")
        print(f"{arm:<14}" + "".join(f"{mean[arm][c - 1]:>10.4f}" if c <= len(mean[arm])
                                     else f"{'-':>10}" for c in checkpoints) + f"   {match}")
    at = min(100, min(len(c) for c in mean.values()))
    for arm in arms:
        if arm == "random" or "random" not in curves:
            continue
        wins = sum(curves[arm][s][at - 1] > curves["random"][s][at - 1] for s in curves[arm])
        print(f"{arm} beats random at {at} trials in {wins} of {seeds} seeds "
              f"(one-sided sign test p = {sign_test(wins, seeds):.3f})")
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=100, help="trials per search")
    parser.add_argument("--random-trials", type=int, default=150,
                        help="trials per random search (to find how many match the others)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--jobs", type=int, default=1, help="searches at once (processes)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--experiment", default=str(ROOT / "experiments" / "digits_cnn.toml"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "search_efficiency.json")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="summarize an earlier run's curves instead of searching")
    args = parser.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        mean = summarize(saved["curves"], saved["seeds"], saved["trials"], saved["experiment"],
                         saved["quick"])
        plot(mean, args.from_json.with_suffix(".png"))
        return
    arms = args.arms.split(",")
    curves: dict[str, dict[int, list[float]]] = {arm: {} for arm in arms}
    with tempfile.TemporaryDirectory() as teachers, ProcessPoolExecutor(args.jobs) as pool:
        # the first arm of every seed trains its teacher; the others reuse it
        def trials(arm: str) -> int:
            return args.random_trials if arm == "random" else args.trials

        first = {seed: pool.submit(one_search, args.experiment, seed, arms[0], trials(arms[0]),
                                   args.quick, teachers) for seed in range(args.seeds)}
        for seed, job in first.items():
            curves[arms[0]][seed] = job.result()
        rest = {(seed, arm): pool.submit(one_search, args.experiment, seed, arm, trials(arm),
                                         args.quick, teachers)
                for seed in range(args.seeds) for arm in arms[1:]}
        for (seed, arm), job in rest.items():
            curves[arm][seed] = job.result()
    mean = summarize(curves, args.seeds, args.trials, Path(args.experiment).name, args.quick)
    args.out.write_text(json.dumps({"seeds": args.seeds, "trials": args.trials,
                                    "random_trials": args.random_trials,
                                    "experiment": Path(args.experiment).name,
                                    "quick": args.quick, "curves": curves}, indent=1))
    plot(mean, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
