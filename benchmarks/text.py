"""The text workload side by side (issue 19): all-MiniLM-L6-v2 fine-tuned on BBC News, what a
user would try by hand, and what a search of ``experiments/minilm_bbc.toml`` finds.

One run measures, on the same machine and in the same minutes:

- the teacher: the run's own, fine-tuned on the training split (cached in the run folder),
  and the same with its vocabulary pruned to the training split's tokens (what that alone
  saves);
- ``dynamic int8``: PyTorch's dynamic int8 quantization of every ``nn.Linear`` of it, what a
  user tries first;
- ``3-layer student``: DistilBERT's recipe, teacher layers 1, 3 and 5 (every other one) and
  distillation on the logits, with the run's training settings and the search's distillation
  learning rate;
- every Pareto trial of the search (run here with ``--timeout``, or read from ``--run-dir``
  when that run has finished), as ``slimsearch.load_model`` gives it.

Sizes are file bytes (slimsearch's model file; ``torch.save`` of the state dict for the
hand-made int8 model, the file a user would ship). Latency is timed here for every model in
alternating rounds at batch 1 and 32, 1 thread (ratios of figures from the same minutes;
absolute milliseconds depend on the machine and the day).

    python benchmarks/text.py --timeout 90m              # the search, then the table
    python benchmarks/text.py --run-dir runs/minilm_bbc  # the table of a finished search
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slimsearch.compression import MODEL_FILE, CompressedModel, build, save_artifact  # noqa: E402
from slimsearch.compression.vocabulary import prune_vocabulary  # noqa: E402
from slimsearch.experiment import load_experiment  # noqa: E402
from slimsearch.runtimes import load_model  # noqa: E402
from slimsearch.search.teacher import prepare_teacher  # noqa: E402
from slimsearch.spaces import Recipe  # noqa: E402
from slimsearch.tasks import factory_path, make_task  # noqa: E402
from slimsearch.tasks.data import call_model  # noqa: E402
from slimsearch.training import score  # noqa: E402

CPU = torch.device("cpu")
EXPERIMENT = REPO / "experiments" / "minilm_bbc.toml"


def interleaved_ms(models: dict[str, nn.Module], inputs: dict, *, rounds: int,
                   calls: int) -> dict[str, float]:
    """Median milliseconds per call of each model, timed in alternating rounds."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(2):
                call_model(model, inputs)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(calls):
                    call_model(model, inputs)
                times[name].append((time.perf_counter() - start) / calls * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def saved_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the file a user ships a model as."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        torch.save(model.state_dict(), path)
        return path.stat().st_size


def search(run_dir: Path, timeout: str) -> None:
    """``slimsearch run`` of the experiment into ``run_dir`` (continued if it exists)."""
    command = [sys.executable, "-m", "slimsearch", "run", str(EXPERIMENT), "--timeout", timeout,
               "--run-dir", str(run_dir)]
    print("$ " + " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "minilm_bbc_benchmark")
    parser.add_argument("--timeout", default=None,
                        help="run the search for this long first, e.g. 90m (default: only "
                             "read --run-dir, which must hold a finished search)")
    args = parser.parse_args()
    if args.timeout is not None:
        search(args.run_dir, args.timeout)
    pareto_file = args.run_dir / "pareto.json"
    if not pareto_file.is_file():
        sys.exit(f"{args.run_dir} holds no finished search: run with --timeout 90m")
    config = load_experiment(args.run_dir / "experiment.toml")
    print(f"# {date.today()}, {platform.machine()}, {platform.node()}, torch {torch.__version__}, "
          f"run {args.run_dir}")
    task = make_task(config.task, seed=config.seed, options=config.task_options)
    teacher = prepare_teacher(task, config.train, seed=config.seed,
                              cache_dir=args.run_dir / "teacher", device=CPU)
    if teacher.trained_here:
        print("(the run's cached teacher did not match: trained again here)")

    start = time.time()
    # Distilled at the search's own distillation learning rate (its first choice), so the
    # hand-made student is not held back by a setting the search was given and it was not.
    lr = config.space.distillation.get("lr", (config.train.lr,))[0]
    student_recipe = Recipe(student={"depth": 3}, student_init="slice",
                            distillation={"lr": lr})
    student = build(task, teacher.model, teacher.targets, student_recipe, train=config.train,
                    seed=config.seed, device=CPU)
    print(f"3-layer student distilled: {config.train.distill_epochs} epochs at lr {lr:g} in "
          f"{time.time() - start:.0f} s")
    with tempfile.TemporaryDirectory() as folder:
        student_bytes = save_artifact(student, Path(folder) / MODEL_FILE).stat().st_size
        teacher_bytes = (args.run_dir / "teacher" / MODEL_FILE).stat().st_size
    # What vocabulary pruning alone saves: the teacher with only the token-table rows of the
    # training split's tokens (and the special ones), nothing else changed.
    pruned = copy.deepcopy(teacher.model)
    kept = prune_vocabulary(pruned, task.vocabulary, task.data("train"), task.example_inputs(1))
    print(f"vocabulary pruned: {kept}")
    with tempfile.TemporaryDirectory() as folder:
        pruned_bytes = save_artifact(CompressedModel(pruned, factory_path(task.make_model),
                                                     dict(task.teacher_kwargs)),
                                     Path(folder) / MODEL_FILE).stat().st_size
    int8 = torch.ao.quantization.quantize_dynamic(load_model(args.run_dir / "teacher" / MODEL_FILE,
                                                             int8=False),
                                                  {nn.Linear}, dtype=torch.qint8)
    models = {"teacher": (teacher.model, teacher_bytes),
              "teacher, vocabulary pruned": (pruned.eval(), pruned_bytes),
              "dynamic int8": (int8, saved_bytes(int8)),
              "3-layer student": (student.model.eval(), student_bytes)}
    pareto = json.loads(pareto_file.read_text())
    for entry in pareto["trials"]:
        folder = args.run_dir / "trials" / f"{entry['number']:05d}"
        models[f"trial {entry['number']}"] = (load_model(folder),
                                              (folder / MODEL_FILE).stat().st_size)

    torch.set_num_threads(config.target.threads)
    latency = {1: interleaved_ms({n: m for n, (m, _) in models.items()}, task.example_inputs(1),
                                 rounds=7, calls=10),
               32: interleaved_ms({n: m for n, (m, _) in models.items()},
                                  task.example_inputs(32), rounds=5, calls=1)}
    torch.set_num_threads(2)
    rows = {}
    for name, (model, size) in models.items():
        rows[name] = {"val": score(model, task.data("val"), task.metric, device=CPU),
                      "test": score(model, task.data("test"), task.metric, device=CPU),
                      "bytes": size, "ms1": latency[1][name], "ms32": latency[32][name]}
    base = rows["teacher"]
    print("\n| model | val acc | test acc | test drop (points) | bytes | smaller | batch 1 ms "
          "| faster | batch 32 ms | faster |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['val']:.4f} | {row['test']:.4f} | "
              f"{100 * (base['test'] - row['test']):.2f} | {row['bytes']:,} | "
              f"{base['bytes'] / row['bytes']:.1f}x | {row['ms1']:.2f} | "
              f"{base['ms1'] / row['ms1']:.2f}x | {row['ms32']:.1f} | "
              f"{base['ms32'] / row['ms32']:.2f}x |")
    searched = {n: r for n, r in rows.items() if n.startswith("trial ")}
    goal = [n for n, r in searched.items()
            if base["bytes"] / r["bytes"] >= 10 and base["ms1"] / r["ms1"] >= 5
            and base["test"] - r["test"] <= 0.01]
    print(f"\nPareto trials at least 10x smaller and 5x faster at batch 1 within 1 point of "
          f"the teacher's test accuracy: {', '.join(goal) or 'none'}")
    for baseline in ("dynamic int8", "3-layer student"):
        b = rows[baseline]
        beating = [n for n, r in searched.items()
                   if r["test"] >= b["test"] and r["bytes"] < b["bytes"] and r["ms1"] < b["ms1"]]
        print(f"dominating {baseline} (test accuracy at least its own, fewer bytes and less "
              f"batch-1 latency): {', '.join(beating) or 'none'}")
    if goal:
        export_and_reload(args.run_dir, int(goal[0].removeprefix("trial ")), rows[goal[0]]["test"])


#: Scores the exported bundle's test accuracy in a process of its own.
RELOAD = """
import sys, torch, slimsearch
from slimsearch.experiment import load_experiment
from slimsearch.tasks import make_task
from slimsearch.training import score
config = load_experiment(sys.argv[2])
task = make_task(config.task, seed=config.seed, options=config.task_options)
model = slimsearch.load_model(sys.argv[1])
print(repr(score(model, task.data("test"), task.metric, device=torch.device("cpu"))))
"""


def export_and_reload(run_dir: Path, number: int, test: float) -> None:
    """``slimsearch export`` of trial ``number``, then ``slimsearch.load_model`` of the bundle
    in a fresh process: its test accuracy must be the table's ``test``, exactly."""
    bundle = run_dir / f"export_trial_{number}"
    if bundle.exists():
        shutil.rmtree(bundle)  # a folder this benchmark created on an earlier run
    command = [sys.executable, "-m", "slimsearch", "export", str(run_dir), "--trial",
               str(number), "--out", str(bundle)]
    print("\n$ " + " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    out = subprocess.run([sys.executable, "-c", RELOAD, str(bundle),
                          str(run_dir / "experiment.toml")],
                         capture_output=True, text=True, check=True, cwd=REPO)
    fresh = float(out.stdout.strip().splitlines()[-1])
    print(f"trial {number} exported to {bundle}; load_model in a fresh process: test accuracy "
          f"{fresh!r} ({'the same, exactly' if fresh == test else f'NOT the same as {test!r}'})")


if __name__ == "__main__":
    main()
