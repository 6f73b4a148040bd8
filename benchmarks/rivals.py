"""The hand-made recipes against their nearest searched rivals, on the mean of fresh builds.

    python benchmarks/rivals.py OUT [--builds 6] [--rivals 2] [--seeds 0 1 2]

OUT: a folder that ``benchmarks/beat_expert.py --out OUT`` wrote. For each seed's run and
each hand-made recipe, its rivals are the searched trials that are smaller and faster than
it (fewer bytes, lower latency at the run's latency batch) and, of those, the ``--rivals``
most accurate on validation. Each recipe is built again ``--builds`` times with fresh
training seeds, by the run's trial runner, and each rival is compared with the hand-made
recipe on the mean validation accuracy.

Why fresh seeds, not the builds the search compared: a rival is chosen because its build
read the highest, so that build reads high by selection alone; a build of the same recipe
with another seed does not. Bytes and latency do not depend on the seed (one executed form
has one latency reading in the run's cache), so only accuracy is drawn again. A build's
accuracy also depends on how many threads it trains with (the float sums run in another
order): the fresh builds of both sides are made here with the same setting.

Each rival gets a verdict: "searched better" where the difference of the means is more than
two standard errors above zero, "hand-made better" where it is more than two below, and
"tie" otherwise: such a rival may still beat the hand-made build in one run, but only as
often as a draw of the training seed favours it. The hand-made recipe is beaten on the mean
when one of its rivals is better (with two rivals, a tie called better by chance is a
little more likely than with one).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from beat_expert import OTHER_SEEDS
from compression import recipes

from slimsearch.report.data import load_report_data
from slimsearch.run import better_in
from slimsearch.search.objective import runner_for_run
from slimsearch.spaces import Recipe, SearchSpace

#: A difference of means this many standard errors from zero is called a difference.
STANDARD_ERRORS = 2.0


def rivals(searched: dict[int, dict[str, Any]], target: dict[str, Any], count: int) -> list[int]:
    """The ``count`` searched trials (number -> metrics) smaller and faster than ``target``
    that read the highest validation accuracy, the highest first."""
    smaller_and_faster = [n for n, m in searched.items()
                          if {"size_bytes", "latency_ms"} <= set(better_in(m, target))]
    return sorted(smaller_and_faster, key=lambda n: (-searched[n]["val_accuracy"], n))[:count]


def verdict(searched: list[float], hand_made: list[float]) -> tuple[float, float, str]:
    """(difference of the mean accuracies, searched minus hand-made; its standard error;
    what it says)."""
    difference = statistics.mean(searched) - statistics.mean(hand_made)
    error = (statistics.variance(searched) / len(searched)
             + statistics.variance(hand_made) / len(hand_made)) ** 0.5
    if difference > STANDARD_ERRORS * error:
        return difference, error, "searched better"
    if difference < -STANDARD_ERRORS * error:
        return difference, error, "hand-made better"
    return difference, error, "tie"


def builds(runner: Any, recipe: Recipe, folder: Path, seeds: list[int]) -> list[float]:
    """Validation accuracy (a fraction) of ``recipe`` built with each of ``seeds``."""
    return [runner(recipe, folder / f"seed-{s}", seed=s)["val_accuracy"] for s in seeds]


def compare_seed(out: Path, seed: int, *, count: int, rival_count: int) -> dict[str, Any]:
    """Every hand-made recipe of seed ``seed``'s run in ``out`` against its rivals; prints a
    table and returns, by recipe, its fresh builds and each rival's."""
    run_dir = out / f"seed-{seed}" / "run"
    runner = runner_for_run(str(run_dir))
    data = load_report_data(run_dir)
    searched = {t.number: t for t in data.completed if t.baseline is None}
    figures = {n: t.metrics for n, t in searched.items()}
    made = recipes(runner.task, SearchSpace(runner.task, runner.config.space))
    scratch = out / f"seed-{seed}" / "rivals"
    print(f"\nseed {seed}: {count} fresh builds of each recipe (hand-made: seed {seed} + k * "
          f"{OTHER_SEEDS}; a rival: that + its trial number), validation accuracy")
    print("| hand-made recipe (x smaller, x faster) | its mean +- sd | rival (x smaller, x faster)"
          " | rival's mean +- sd | difference (+- 2 SE) | verdict |")
    print("|---|---|---|---|---|---|")
    rows: dict[str, Any] = {}
    rebuilt: dict[int, list[float]] = {}  # one rival may face several recipes
    for i, (label, recipe) in enumerate(made.items()):
        metrics_file = out / f"seed-{seed}" / "hand-made" / f"{i:02d}" / "metrics.json"
        if not metrics_file.is_file():
            print(f"| {label} | not built by beat_expert.py | | | | |")
            continue
        target = json.loads(metrics_file.read_text())
        mine = builds(runner, recipe, scratch / f"hand-made-{i:02d}",
                      [seed + k * OTHER_SEEDS for k in range(1, count + 1)])
        head = (f"{label} ({target['size_ratio']:.1f}x, {target['speedup']:.2f}x) | "
                f"{statistics.mean(mine):.4f} +- {statistics.stdev(mine):.4f}")
        rows[label] = {"builds": mine, "rivals": {}}
        found = rivals(figures, target, rival_count)
        if not found:
            print(f"| {head} | none smaller and faster | | | NOT beaten |")
        for number in found:
            if number not in rebuilt:
                rebuilt[number] = builds(runner, Recipe.from_dict(searched[number].recipe),
                                         scratch / f"trial-{number:05d}",
                                         [seed + k * OTHER_SEEDS + number
                                          for k in range(1, count + 1)])
            theirs = rebuilt[number]
            difference, error, said = verdict(theirs, mine)
            rows[label]["rivals"][number] = {"builds": theirs, "difference": difference,
                                             "standard_error": error, "verdict": said}
            m = figures[number]
            print(f"| {head} | trial {number} ({m['size_ratio']:.1f}x, {m['speedup']:.2f}x; "
                  f"val {m['val_accuracy']:.4f} in the search) | {statistics.mean(theirs):.4f} +- "
                  f"{statistics.stdev(theirs):.4f} | {difference * 100:+.2f} +- "
                  f"{STANDARD_ERRORS * error * 100:.2f} points | {said} |", flush=True)
            head = " | "
        verdicts = [r["verdict"] for r in rows[label]["rivals"].values()]
        rows[label]["verdict"] = next((v for v in ("searched better", "tie", "hand-made better")
                                       if v in verdicts), "not beaten: none smaller and faster")
    beaten = [label for label, r in rows.items() if r["verdict"] == "searched better"]
    tied = [label for label, r in rows.items() if r["verdict"] == "tie"]
    print(f"seed {seed}: beaten on the mean {len(beaten)} of {len(rows)}; tied: "
          f"{', '.join(tied) or 'none'}; not beaten: "
          f"{', '.join(sorted(set(rows) - set(beaten) - set(tied))) or 'none'}")
    return rows


def parser_for_runs(description: str) -> argparse.ArgumentParser:
    """A parser of what the scripts that rebuild a ``beat_expert.py`` run's recipes take:
    its --out folder, the seeds and the builds per recipe (``checked_builds`` after)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out", type=Path, help="the --out folder of benchmarks/beat_expert.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--builds", type=int, default=6,
                        help="fresh builds of each recipe (each with its own training seed)")
    return parser


def checked_builds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.builds < 2:
        parser.error(f"--builds {args.builds}: a mean and its spread need 2 builds or more")


def main() -> None:
    parser = parser_for_runs(__doc__.splitlines()[0])
    parser.add_argument("--rivals", type=int, default=2,
                        help="searched trials set against each hand-made recipe")
    args = parser.parse_args()
    checked_builds(parser, args)
    if args.rivals < 1:
        parser.error(f"--rivals {args.rivals}: give 1 or more")
    for seed in args.seeds:
        if not (args.out / f"seed-{seed}" / "hand-made").is_dir():
            parser.error(f"{args.out}/seed-{seed}: no hand-made recipes there; give the --out "
                         "folder of a finished `python benchmarks/beat_expert.py --out OUT` run")
        if (args.out / f"seed-{seed}" / "rivals").exists():
            parser.error(f"{args.out}/seed-{seed}/rivals exists already (an earlier run of "
                         "this script): remove it to build again")
    results = {seed: compare_seed(args.out, seed, count=args.builds, rival_count=args.rivals)
               for seed in args.seeds}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
