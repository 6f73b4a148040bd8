"""The fast end of issue 17: which one-layer changes to the fastest hand-made recipes are
faster on this CPU, and which of them beat the recipe on the mean of fresh builds.

    python benchmarks/fast_end.py OUT [--seeds 0 1 2] [--builds 6] [--rounds 30]

OUT: a folder that ``benchmarks/beat_expert.py --out OUT`` wrote; each seed's run gives the
teacher, the data, the training settings and the trial runner. For each seed, the two
fastest hand-made recipes that no searched trial beats on the mean in some seeds
(``benchmarks/rivals.py``): "width 0.5 sliced + structured 50% + int8 w+a" and "structured
75% + int8 w+a", and variants of each that keep the first convolution whole (16 channels,
where the uniform recipe keeps 8): it reads a single input channel, and on this CPU's int8
kernels its 8 and 16 output channels cost the same, so keeping it whole is more accurate
for no time. The variants that hold more weights than the recipe store a few layers in 4
bits; two are distilled at a higher learning rate (``space.distillation.lr``), with the
hand-made recipe at that rate beside them to tell the two changes apart.

Every recipe is built ``--builds`` times with the training seeds of rivals.py's hand-made
builds (seed + k * 1000) by the run's trial runner, and compared with its hand-made recipe
on the mean validation accuracy (``rivals.verdict``: two standard errors). The executed
forms of the first builds are timed at the run's latency batch, one thread, in
``--rounds`` interleaved rounds (``timing.latency.compare_latency``), so the speed ratios
come from the same moments of the machine, not from readings taken minutes apart. Above
each hand-made recipe's rows: where its executed form spends its time (torch.profiler, self
CPU time by op and input shape).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from beat_expert import OTHER_SEEDS
from compression import recipes
from rivals import STANDARD_ERRORS, checked_builds, parser_for_runs, verdict

from slimsearch.compression import MODEL_FILE
from slimsearch.runtimes import load_model
from slimsearch.search.objective import runner_for_run
from slimsearch.spaces import Recipe, SearchSpace
from slimsearch.timing.latency import compare_latency

HALF = "width 0.5 sliced + structured 50% + int8 w+a"
QUARTER = "structured 75% + int8 w+a"
HIGHER_LR = 0.003  # the distillation learning rate of the variants that say so


def with_layers(recipe: Recipe, **changes: dict) -> Recipe:
    """``recipe`` with the named layers' choices changed (``conv1={"sparsity": 0.0}``)."""
    return replace(recipe, layers={name: replace(layer, **changes.get(name, {}))
                                   for name, layer in recipe.layers.items()})


def conv1_whole(recipe: Recipe) -> Recipe:
    """``recipe`` with the teacher's first convolution, unpruned (a student keeps its other
    widths)."""
    return with_layers(replace(recipe, student={**recipe.student, "width1": 1.0}),
                       conv1={"sparsity": 0.0, "pruning": "unstructured"})


def distilled_at(recipe: Recipe, lr: float) -> Recipe:
    return replace(recipe, distillation={**recipe.distillation, "lr": lr})


def variants(made: dict[str, Recipe]) -> dict[str, dict[str, Recipe]]:
    """Per hand-made recipe: its variants by label, the recipe itself first."""
    half, quarter = made[HALF], made[QUARTER]
    four_bit = {n: {"bits": 4} for n in ("conv2", "conv3", "fc2")}
    return {
        HALF: {
            "hand-made": half,
            "conv1 kept whole": conv1_whole(half),
            "conv1 kept whole; conv2, conv3, fc2 in 4 bits": with_layers(conv1_whole(half),
                                                                        **four_bit),
            f"hand-made, distilled at lr {HIGHER_LR}": distilled_at(half, HIGHER_LR),
            f"conv1 kept whole; conv2, conv3, fc2 in 4 bits; distilled at lr {HIGHER_LR}":
                distilled_at(with_layers(conv1_whole(half), **four_bit), HIGHER_LR),
        },
        QUARTER: {
            "hand-made": quarter,
            "conv1 kept whole": conv1_whole(quarter),
            "conv1 kept whole; fc1 in 4 bits": with_layers(conv1_whole(quarter),
                                                           fc1={"bits": 4}),
        },
    }


def where_the_time_goes(model: Callable, inputs: Any, *, calls: int = 30, top: int = 6
                        ) -> list[tuple[str, str, float]]:
    """(op, its first input's shape, share of the self CPU time) of the ``top`` ops that take
    the most of ``calls`` calls of ``model`` on ``inputs``, one thread (torch.profiler)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(10):
                model(inputs)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        record_shapes=True) as profile:
                for _ in range(calls):
                    model(inputs)
    finally:
        torch.set_num_threads(previous)
    events = profile.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, str(e.input_shapes[0]) if e.input_shapes else "", e.self_cpu_time_total / total)
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]


def compare_seed(out: Path, seed: int, *, count: int, rounds: int) -> None:
    runner = runner_for_run(str(out / f"seed-{seed}" / "run"))
    made = recipes(runner.task, SearchSpace(runner.task, runner.config.space))
    seeds = [seed + k * OTHER_SEEDS for k in range(1, count + 1)]
    batch = runner.config.target.batch_sizes[0]
    print(f"\nseed {seed}: {count} builds of each recipe (training seeds {seeds[0]}, "
          f"{seeds[1]}, ...), validation accuracy; bytes; latency at batch {batch}, 1 thread, "
          f"{rounds} interleaved rounds, as a ratio to the hand-made recipe's")
    print("| recipe | mean +- sd | against the hand-made mean (+- 2 SE) | verdict | bytes | "
          "latency ratio |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="fast-end-") as scratch:
        for target, forms in variants(made).items():
            built: dict[str, tuple[list[float], int, Path]] = {}
            for i, (label, recipe) in enumerate(forms.items()):
                folders = [Path(scratch, f"{target[:9]}-{i}-{s}".replace(" ", "_"))
                           for s in seeds]
                metrics = [runner(recipe, folder, seed=s) for folder, s in zip(folders, seeds,
                                                                                strict=True)]
                built[label] = ([m["val_accuracy"] for m in metrics], metrics[0]["size_bytes"],
                                folders[0] / MODEL_FILE)
            models: dict[str, Callable] = {label: load_model(path)
                                           for label, (_, _, path) in built.items()}
            times = compare_latency(models, runner.task.example_inputs(batch),
                                    threads=1, rounds=rounds, window_s=0.05)
            shares = where_the_time_goes(models["hand-made"], runner.task.example_inputs(batch))
            print(f"| where {target}'s time goes: " + "; ".join(
                f"{op} {shape} {share:.0%}" for op, shape, share in shares) + " | | | | | |")
            mine = built["hand-made"][0]
            for label, (accuracies, size, _) in built.items():
                difference, error, said = verdict(accuracies, mine)
                said = said.replace("searched better", "variant better")
                name = target if label == "hand-made" else f"&nbsp;&nbsp;{label}"
                against = "" if label == "hand-made" else (
                    f"{difference * 100:+.2f} +- {STANDARD_ERRORS * error * 100:.2f} points")
                print(f"| {name} | {statistics.mean(accuracies):.4f} +- "
                      f"{statistics.stdev(accuracies):.4f} | {against} | "
                      f"{'' if label == 'hand-made' else said} | {size:,} | "
                      f"{times[label] / times['hand-made']:.3f} |", flush=True)


def main() -> None:
    parser = parser_for_runs(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    args = parser.parse_args()
    checked_builds(parser, args)
    for seed in args.seeds:
        if not (args.out / f"seed-{seed}" / "run").is_dir():
            parser.error(f"{args.out}/seed-{seed}/run: not there; give the --out folder of a "
                         "finished `python benchmarks/beat_expert.py --out OUT` run")
    for seed in args.seeds:
        compare_seed(args.out, seed, count=args.builds, rounds=args.rounds)


if __name__ == "__main__":
    main()
