"""How far apart are a hand-made recipe and its neighbours, beyond the training seed?

    python benchmarks/recipe_spread.py RUN_DIR [--builds 6] [--out DIR]

Builds structured 50% + 4-bit weights + int8 activations (the recipe that set issue 17's
bar) and 4-bit weights, each next to a few one-knob neighbours (a layer's bits; a student
width), each with training seeds 0..builds-1, by the trial runner of the run in RUN_DIR (a
run of benchmarks/beat_expert.py: its teacher, training settings and latency protocol), and
prints each one's validation accuracy (mean, sd, every build), size and speed-up at the
run's latency batch against the teacher. Recipes that run the same kernels read the same
latency (the run's cache measures one executed form once).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from compression import recipes

from slimsearch.search.objective import runner_for_run
from slimsearch.spaces import Recipe, SearchSpace


def layer(recipe: Recipe, name: str, **changes: Any) -> Recipe:
    return replace(recipe, layers={**recipe.layers, name: replace(recipe.layers[name], **changes)})


def student(recipe: Recipe, **widths: float) -> Recipe:
    return replace(recipe, student={**recipe.student, **widths})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--builds", type=int, default=6)
    parser.add_argument("--out", type=Path, help="folder to create (default: a temporary one)")
    args = parser.parse_args()
    if args.builds < 2:
        parser.error(f"--builds {args.builds}: a spread needs 2 builds or more")
    if not (args.run_dir / "teacher" / "metrics.json").is_file():
        parser.error(f"{args.run_dir}: not a run folder with a trained teacher; give one that "
                     "benchmarks/beat_expert.py --out DIR wrote (DIR/seed-0/run)")
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} exists already; give a folder to create")
    runner = runner_for_run(str(args.run_dir))
    if runner.config.task != "digits-cnn":
        parser.error(f"{args.run_dir} is a run of {runner.config.task}; the neighbours here are "
                     "digits-cnn's layers and widths: give a run of benchmarks/beat_expert.py")
    made = recipes(runner.task, SearchSpace(runner.task, runner.config.space))
    bar, four = made["structured 50% + 4-bit w + int8 a"], made["4-bit weights"]
    cases = {
        "structured 50% + 4-bit + int8": bar,
        "  conv1 at 2 bits": layer(bar, "conv1", bits=2),
        "  fc1 75% structured": layer(bar, "fc1", sparsity=0.75),
        "  student width2 0.75": student(bar, width2=0.75),
        "  student width3 0.75": student(bar, width3=0.75),
        "  student width2, width3 0.75": student(bar, width2=0.75, width3=0.75),
        "  student fc_width 0.5": student(bar, fc_width=0.5),
        "  student width1 0.25 (conv1: 4 channels)": student(bar, width1=0.25),
        "  student width2 0.5 (conv2: 8 channels)": student(bar, width2=0.5),
        "4-bit weights": four,
        "  conv1 at 8 bits": layer(four, "conv1", bits=8),
        "  conv3 at 8 bits": layer(four, "conv3", bits=8),
    }
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        print("| recipe | val accuracy mean +- sd | builds (seeds 0..) | x smaller | x faster |")
        print("|---|---|---|---|---|")
        for i, (label, recipe) in enumerate(cases.items()):
            runs = [runner(recipe, out / f"{i:02d}-{seed}", seed=seed)
                    for seed in range(args.builds)]
            accuracy = [m["val_accuracy"] for m in runs]
            speedups = sorted({round(m["speedup"], 2) for m in runs})
            print(f"| {label} | {statistics.mean(accuracy):.4f} +- {statistics.stdev(accuracy):.4f}"
                  f" | {' '.join(f'{a:.4f}' for a in accuracy)} | {runs[0]['size_ratio']:.1f}x | "
                  f"{'/'.join(f'{s:.2f}' for s in speedups)}x |", flush=True)


if __name__ == "__main__":
    main()
