"""Does a refinement step measure its change better with its parent's training seed?

    python benchmarks/common_seeds.py RUN_DIR [--baselines NAME ...] [--steps bits zeros outputs]

Common random numbers for ``search.refine``: should a refinement train with the seed of the
trial it steps from, so that what it gains or loses is its step's and not another draw's?
Measured and not kept (benchmarks/RESULTS.md, "Refinements on their parent's seed"): a
refinement trains with its own seed. RUN_DIR is a run folder of experiments/digits_cnn.toml,
e.g. ``seed-0/run`` of ``benchmarks/beat_expert.py --out``; it is copied, not written to. For each
seeded baseline named, its one-step neighbours toward smaller of the kinds named (``bits``:
one layer's bits one step down; ``zeros``: one layer's unstructured sparsity one step up;
``outputs``: one student knob one value narrower, or one layer's structured sparsity one
step up), each built twice by the run's trial runner: with the baseline's seed (the run's)
and with another. Prints each neighbour's validation accuracy against the baseline's, and
for each kind and seed policy the mean and spread of the difference, how many are at least
as accurate, and how many beat the baseline in every objective (only a step that removes
outputs can: the others run the same kernels, so they are exactly as fast).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from slimsearch.run import strictly_better
from slimsearch.search import refine
from slimsearch.search.objective import runner_for_run
from slimsearch.spaces import SearchSpace

#: The other seed of the k-th neighbour: the run's seed plus this plus k, never the seed of a
#: searched trial of a 100-trial run (the run's seed plus its number).
OTHER = 100
KINDS = ("bits", "zeros", "outputs")


def neighbours(space: SearchSpace, params: dict) -> Iterator[tuple[str, str, Any, dict]]:
    """(kind, parameter, new value, neighbour's parameters) of every one-step neighbour of
    trial parameters ``params`` toward smaller; a layer pruned for the first time twice, once
    with zeros and once with whole outputs removed (the search's sampler picks the method;
    where a layer can only take zeros, the space gives it zeros both times, and ``main``
    builds that recipe once)."""
    for _, changed, value in refine._moves(params, space, None, "smaller"):
        moved = refine._neighbour(space, params, changed, value)
        if moved is None:
            continue
        if changed.endswith(".bits"):
            yield "bits", changed, value, moved
        elif changed.startswith("student.") or ".pruning" in changed:
            yield "outputs", changed, value, moved
        elif params[changed] == 0:
            method = changed.replace(".sparsity", ".pruning")
            yield "zeros", changed, value, dict(moved, **{method: "unstructured"})
            yield "outputs", changed, value, dict(moved, **{method: "structured"})
        else:
            structured = refine._pruning(params, changed) == "structured"
            yield "outputs" if structured else "zeros", changed, value, moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder of experiments/digits_cnn.toml")
    parser.add_argument("--baselines", nargs="+", default=[
        "weight-only-4-bit", "structured-50%-4-bit", "half-width-structured-50%-int8"])
    parser.add_argument("--steps", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"  # its latency cache grows: a copy, not the user's run
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("trials", "*.lock"))
        runner = runner_for_run(str(run))
        space = SearchSpace(runner.task, runner.config.space)
        seed, baselines = runner.config.seed, space.baselines()
        unknown = sorted(set(args.baselines) - set(baselines))
        if unknown:
            parser.error(f"--baselines {' '.join(unknown)}: this space seeds "
                         f"{', '.join(baselines)}")
        rows, k = [], 0
        print(f"run {args.run}: seed {seed}; validation accuracy of each neighbour built with "
              f"the baseline's seed ({seed}) and with another ({seed + OTHER}+k)")
        for name in args.baselines:
            params = space.params_of(baselines[name])
            parent = runner(baselines[name], run / "builds" / name, seed=seed)
            print(f"{name}: val {parent['val_accuracy']:.4f}")
            built = set()
            for kind, changed, value, moved in neighbours(space, params):
                if kind not in args.steps:
                    continue
                try:
                    recipe = space.suggest(optuna.trial.FixedTrial(moved))
                except ValueError:
                    continue
                if recipe.to_json() in built:  # the head cannot lose outputs: zeros again
                    continue
                built.add(recipe.to_json())
                k += 1
                same, other = (runner(recipe, run / "builds" / f"{name}-{k}-{label}", seed=s)
                               for label, s in (("same", seed), ("other", seed + OTHER + k)))
                rows.append((kind, parent, same, other))
                print(f"  {kind}: {changed} {params[changed]} -> {value}: parent's seed "
                      f"{_read(same, parent)}, another {_read(other, parent)}", flush=True)
    for kind in args.steps:
        for label, at in (("the parent's seed", 2), ("another seed", 3)):
            of = [r for r in rows if r[0] == kind]
            if not of:
                continue
            gaps = [r[at]["val_accuracy"] - r[1]["val_accuracy"] for r in of]
            print(f"{kind}, {label}: difference to the parent {statistics.mean(gaps):+.4f} "
                  f"+- {statistics.pstdev(gaps):.4f}, as accurate or more "
                  f"{sum(g >= 0 for g in gaps)}/{len(of)}, better in every objective "
                  f"{sum(strictly_better(r[at], r[1]) for r in of)}/{len(of)}")


def _read(metrics: dict, parent: dict) -> str:
    """A neighbour's validation accuracy, and whether it beats its parent in every objective."""
    return f"{metrics['val_accuracy']:.4f}" + (" (beats it)" if strictly_better(metrics, parent)
                                               else "")


if __name__ == "__main__":
    main()
