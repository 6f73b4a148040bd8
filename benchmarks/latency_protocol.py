"""Is the latency protocol steady, and what does it cost? (issue 4)

    python benchmarks/latency_protocol.py [--repeats 20] [--trials 30]

1. Steadiness: the teacher models of digits-mlp and digits-cnn at batch 1 (1 thread), each
   measured --repeats times with the full protocol, idling 0.2 s in between as a search does.
   Prints every result, the CV of the results, and the CV of the plain medians of the same
   samples (what the protocol without the machine probe reported).
2. Cost: a --trials digits-mlp search (experiments/digits_mlp.toml) in a temporary folder:
   the share of trial time spent measuring latency (the int8 plan's timings included) and on
   bookkeeping (everything but training/compressing and accuracy), from each trial's record.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimsearch.evaluators import measure_latency
from slimsearch.experiment import TargetConfig, load_experiment
from slimsearch.search import prepare, run_search
from slimsearch.search.run_folder import RunFolder
from slimsearch.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


def steadiness(repeats: int) -> None:
    target = TargetConfig()  # the protocol's defaults, as a search uses them
    for name in ("digits-mlp", "digits-cnn"):
        task = make_task(name, seed=0)
        torch.manual_seed(0)
        model = task.make_model(**task.teacher_kwargs).eval()
        x = task.example_inputs(1)
        results, seconds = [], []
        for _ in range(repeats):
            time.sleep(0.2)
            start = time.perf_counter()
            results.append(measure_latency(model, x, device=torch.device("cpu"), threads=1,
                                           max_cv=target.max_cv, max_repeats=target.max_repeats,
                                           quiet_wait_s=target.quiet_wait_s))
            seconds.append(time.perf_counter() - start)
        medians = [r.median_ms * 1e3 for r in results]
        raw = [r.raw_median_ms * 1e3 for r in results]
        print(f"{name}, batch 1, 1 thread, {repeats} measurements (us): "
              f"{' '.join(f'{m:.1f}' for m in medians)}")
        print(f"  CV {cv(medians):.2%} | plain medians of the same samples: CV {cv(raw):.2%} "
              f"({min(raw):.1f}-{max(raw):.1f} us) | disturbed (scaled) "
              f"{sum(r.disturbed for r in results)}/{repeats} | mean quiet fraction "
              f"{statistics.fmean(r.quiet_fraction for r in results):.2f} | "
              f"{statistics.fmean(seconds):.2f} s per measurement")


def cost(trials: int) -> None:
    from slimsearch.report.data import load_report_data

    config = load_experiment(ROOT / "experiments" / "digits_mlp.toml")
    with tempfile.TemporaryDirectory() as folder:
        prepared = prepare(config, run_dir=Path(folder) / "run", storage_url=None)
        start = time.perf_counter()
        run_search(prepared, ROOT / "experiments" / "digits_mlp.toml", trials=trials,
                   timeout_s=None, say=lambda _line: None)
        total = time.perf_counter() - start
        data = load_report_data(RunFolder(Path(folder) / "run").root)
        wall = build = accuracy = latency = 0.0
        for t in data.completed:
            s = t.metrics["seconds"]
            wall += t.seconds
            build += s["build"]
            accuracy += s["val_accuracy"] + s["test_accuracy"]
            latency += s["plan"] + s["latency_ms"]
        reused, figures = data.latency_cache
    other = wall - build - accuracy - latency
    print(f"{trials}-trial digits-mlp search: {total:.1f} s in all (teacher included), "
          f"{wall:.1f} s of trial time")
    print(f"  training+compressing {build / wall:.1%}, accuracy {accuracy / wall:.1%}, "
          f"latency measurement {latency / wall:.1%}, bookkeeping {other / wall:.1%}; "
          f"latency + bookkeeping {(latency + other) / wall:.1%}; latency cache reused "
          f"{reused}/{figures}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    steadiness(args.repeats)
    cost(args.trials)


if __name__ == "__main__":
    main()
