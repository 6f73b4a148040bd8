"""The text workload's hand-made baselines (issue 19; the search's front is still to come).

Fine-tunes the minilm-bbc teacher exactly as a run does (``train`` of
``experiments/minilm_bbc.toml``: its epochs, learning rate and batch size, seed 0), scores it,
then applies what a user would try first, PyTorch's dynamic int8 quantization of every
``nn.Linear``, and times both at batch 1 on 1 thread, interleaved (the speed-up is a ratio
of two figures taken in the same minute; the absolute milliseconds depend on the machine).

    python benchmarks/text.py
"""

from __future__ import annotations

import copy
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slimsearch.experiment import load_experiment  # noqa: E402
from slimsearch.tasks import make_task  # noqa: E402
from slimsearch.tasks.data import call_model  # noqa: E402
from slimsearch.training import fit, score  # noqa: E402

CPU = torch.device("cpu")


def interleaved_ms(models: dict[str, torch.nn.Module], inputs: dict, rounds: int = 7,
                   calls: int = 10) -> dict[str, float]:
    """Median milliseconds per call of each model, timed in alternating rounds."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(3):
                call_model(model, inputs)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(calls):
                    call_model(model, inputs)
                times[name].append((time.perf_counter() - start) / calls * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    config = load_experiment(REPO / "experiments" / "minilm_bbc.toml")
    train = config.train
    print(f"# {date.today()}, {platform.machine()}, {torch.get_num_threads()} threads for "
          f"training, torch {torch.__version__}")
    task = make_task(config.task, seed=config.seed, options=config.task_options)
    torch.manual_seed(config.seed)
    teacher = task.make_model(**task.teacher_kwargs)
    start = time.time()
    fit(teacher, task.data("train"), epochs=train.teacher_epochs, lr=train.lr,
        batch_size=train.batch_size, weight_decay=train.weight_decay, seed=config.seed, device=CPU)
    teacher.eval()
    print(f"teacher fine-tuned: {train.teacher_epochs} epochs in {time.time() - start:.0f} s")
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(teacher), {torch.nn.Linear},
                                                  dtype=torch.qint8)
    torch.set_num_threads(1)
    inputs, _ = task.data("val").head(1)
    latency = interleaved_ms({"teacher": teacher, "dynamic int8": int8}, inputs)
    for name, model in (("teacher", teacher), ("dynamic int8", int8)):
        val = score(model, task.data("val"), task.metric, device=CPU)
        test = score(model, task.data("test"), task.metric, device=CPU)
        print(f"{name:>13}: val {val:.4f}, test {test:.4f}, batch 1 (1 thread) "
              f"{latency[name]:.2f} ms, {latency['teacher'] / latency[name]:.2f}x the teacher's speed")


if __name__ == "__main__":
    main()
