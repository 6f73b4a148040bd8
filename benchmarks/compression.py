"""Each compression method alone and hand-picked combinations, measured in one run.

    python benchmarks/compression.py [--tasks digits-mlp digits-cnn digits-resnet] [--quick]

For every task: the teacher is trained (cached under --cache), then each recipe below is built
by the same pipeline a search uses, materialized for a target batch of 1 and of 256 (the int8
layer choice depends on the batch), written to its model file, reloaded, and measured: test
accuracy, the file's bytes, and latency at batch 1 and 256 on CPU with 1 thread, as ratios to
the teacher: the median of three teacher/model pairs measured back to back. A row whose model
is more than 5% slower than the teacher at a batch is flagged SLOWER.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from slimsearch.compression import MODEL_FILE, build, save_artifact
from slimsearch.evaluators import measure_latency
from slimsearch.experiment import SpaceConfig, TrainConfig
from slimsearch.runtimes import load_model, plan_execution
from slimsearch.search.teacher import prepare_teacher
from slimsearch.spaces import SearchSpace
from slimsearch.spaces.recipe import LayerRecipe, Recipe
from slimsearch.tasks import Task, make_task
from slimsearch.training import accuracy

CPU = torch.device("cpu")
BATCHES = (1, 256)


def recipes(task: Task, space: SearchSpace) -> dict[str, Recipe]:
    """Hand-picked recipes: each method alone, then combinations."""
    teacher = dict(task.teacher_kwargs)

    def every(*, sparsity: float = 0.0, pruning: str = "unstructured", bits: int = 32,
              acts: int = 32, student: dict | None = None, init: str = "slice") -> Recipe:
        layers = space.layers_for(student or teacher)
        pruned = {i.name for i in layers if sparsity > 0
                  and (pruning == "unstructured" or i.structured_ok)}
        # a layer left whole has no pruning method, as in the space's own recipes
        return Recipe(student=student or teacher, student_init=init, activation_bits=acts,
                      layers={i.name: LayerRecipe(
                          sparsity=sparsity if i.name in pruned else 0.0,
                          pruning=pruning if i.name in pruned else "unstructured", bits=bits)
                          for i in layers})

    # the half-width student as the space spells it (SearchSpace.half_width_student): the
    # seeded baseline of the same name is then the same model file, and the run's latency
    # cache gives both one reading of their one executed form (a second reading of the same
    # form would decide "faster" by timing noise alone)
    half = space.half_width_student() or {**teacher, "width": 0.5}
    return {
        "teacher (fp32)": every(),
        "int8 weights": every(bits=8),
        "int8 weights + int8 activations": every(bits=8, acts=8),
        "4-bit weights": every(bits=4),
        "unstructured 50%": every(sparsity=0.5),
        "structured 50%": every(sparsity=0.5, pruning="structured"),
        "student width 0.5, sliced": every(student=half),
        "student width 0.5, scratch": every(student=half, init="scratch"),
        "structured 50% + int8 w+a": every(sparsity=0.5, pruning="structured", bits=8, acts=8),
        "structured 50% + 4-bit w + int8 a": every(sparsity=0.5, pruning="structured", bits=4,
                                                   acts=8),
        "structured 75% + int8 w+a": every(sparsity=0.75, pruning="structured", bits=8, acts=8),
        "width 0.5 sliced + structured 50% + int8 w+a": every(
            student=half, sparsity=0.5, pruning="structured", bits=8, acts=8),
    }


def _speedup(teacher: torch.nn.Module, model: torch.nn.Module, inputs: torch.Tensor, *,
             samples: int, warmup: int, pairs: int = 3) -> float:
    """Median over ``pairs`` of teacher-time / model-time, each pair measured back to back,
    so a machine-wide slowdown between rows cancels out of the ratio."""
    ratios = []
    for _ in range(pairs):
        t = measure_latency(teacher, inputs, device=CPU, threads=1, warmup=warmup, samples=samples)
        m = measure_latency(model, inputs, device=CPU, threads=1, warmup=warmup, samples=samples)
        ratios.append(t.median_ms / m.median_ms)
    return statistics.median(ratios)


def run_task(name: str, train: TrainConfig, cache: Path, samples_256: int) -> None:
    task = make_task(name, seed=0)
    space = SearchSpace(task, SpaceConfig())
    teacher = prepare_teacher(task, train, seed=0, cache_dir=cache / name, device=CPU)
    print(f"\n## {name} (teacher {'trained' if teacher.trained_here else 'cached'})")
    print("| recipe | test acc | bytes | x smaller | batch 1: x faster | batch 256: x faster | "
          "int8 layers (b1 / b256) |")
    print("|---|---|---|---|---|---|---|")
    rows: dict[str, dict[int, tuple]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, recipe in recipes(task, space).items():
            compressed = build(task, teacher.model, teacher.targets, recipe, train=train,
                               seed=0, device=CPU, round_to=8 if "structured" in label else 1)
            rows[label] = {}
            for batch in BATCHES:
                plan = plan_execution(compressed.model, {n: r.bits for n, r in recipe.layers.items()},
                                      batch=task.example_inputs(batch), calibration=task.train.x[:512],
                                      activation_bits=recipe.activation_bits, threads=1)
                compressed.execution = plan.to_dict() if plan else None
                path = save_artifact(compressed, Path(tmp) / f"{len(rows)}-{batch}" / MODEL_FILE)
                model = load_model(path)
                rows[label][batch] = (model, path.stat().st_size,
                                      accuracy(model, task.test, device=CPU),
                                      len(plan.int8_layers) if plan else 0, len(recipe.layers))
    base = rows["teacher (fp32)"]
    for label, row in rows.items():
        speed = {b: _speedup(base[b][0], row[b][0], task.example_inputs(b),
                             samples=500 if b == 1 else samples_256, warmup=100 if b == 1 else 5)
                 for b in BATCHES}
        flags = {b: " SLOWER" if speed[b] < 0.95 else "" for b in BATCHES}
        print(f"| {label} | {row[256][2]:.4f} | {row[256][1]:,} | {base[256][1] / row[256][1]:.1f}x"
              f" | {speed[1]:.2f}x{flags[1]} | {speed[256]:.2f}x{flags[256]} | "
              f"{row[1][3]} / {row[256][3]} of {row[256][4]} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits-mlp", "digits-cnn", "digits-resnet"])
    parser.add_argument("--cache", default="runs/benchmark-teachers")
    parser.add_argument("--quick", action="store_true", help="few epochs: checks the script runs")
    args = parser.parse_args()
    train = TrainConfig(teacher_epochs=40, distill_epochs=20, finetune_epochs=15, qat_epochs=5)
    if args.quick:
        train = replace(train, teacher_epochs=3, distill_epochs=1, finetune_epochs=1, qat_epochs=1)
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}; torch {torch.__version__}; "
          f"int8 engine {torch.backends.quantized.engine}; latency on CPU, 1 thread; "
          f"train: {train}")
    for name in args.tasks:
        run_task(name, train, Path(args.cache), samples_256=30 if args.quick else 60)


if __name__ == "__main__":
    main()
