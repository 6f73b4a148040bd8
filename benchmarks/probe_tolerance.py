"""Does the model slow down when the machine probe does? And which quiet tolerance follows it?
(issue 4)

    python benchmarks/probe_tolerance.py [--task digits-cnn] [--measurements 200]
                                         [--save FILE | --load FILE]

Takes --measurements CPU measurements of the task's teacher (batch 1, 1 thread, the default
protocol without repeats, 0.2 s apart) and keeps every window's samples with the probe's
readings before and after it (``--save`` writes them as JSON, ``--load`` replays a saved set
instead of measuring). Then prints:

1. the model's window medians relative to its normal speed (the median of all measurements'
   plain medians), grouped by the probe's reading relative to its floor: where the model keeps
   its speed while the probe reads slower, scaling by the probe would report it too fast;
2. the same windows replayed through the protocol's window filter at several quiet
   tolerances: the CV of the results, how many were scaled, and how many ended more than 3%
   from the model's normal speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slimsearch.evaluators import measure_latency
from slimsearch.tasks import make_task
from slimsearch.timing import latency as protocol
from slimsearch.timing.latency import _chosen_samples, _undisturbed, _Window

TOLERANCES = (0.05, 0.10, 0.15, 0.20, 0.30)
#: Probe reading / floor: the edges of the groups in part 1.
EDGES = (0.0, 1.05, 1.10, 1.15, 1.20, 1.30, 1.50, float("inf"))


def measure(task_name: str, measurements: int) -> dict:
    """Real measurements; the windows are taken from the protocol's own last look at them."""
    seen = {}

    def keep(windows, probe):  # the protocol's filter, called last with every window
        seen["windows"], seen["floor_us"] = windows, probe.floor_us
        return _undisturbed(windows, probe)

    protocol._undisturbed = keep
    task = make_task(task_name, seed=0)
    torch.manual_seed(0)
    model = task.make_model(**task.teacher_kwargs).eval()
    rows = []
    for _ in range(measurements):
        time.sleep(0.2)
        measure_latency(model, task.example_inputs(1), device=torch.device("cpu"), threads=1,
                        max_repeats=0)
        rows.append({"floor_us": seen["floor_us"],
                     "windows": [[w.before_us, w.times_ms, w.after_us] for w in seen["windows"]]})
    protocol._undisturbed = _undisturbed
    return {"task": task_name, "measurements": rows}


class _Probe:
    """The probe's floor and a quiet test at a chosen tolerance (replay only)."""

    def __init__(self, floor_us: float, tolerance: float) -> None:
        self.floor_us, self.tolerance = floor_us, tolerance

    def is_quiet(self, reading_us: float) -> bool:
        return reading_us <= self.floor_us * (1 + self.tolerance)


def replay(row: dict, tolerance: float, samples: int = 500) -> tuple[float, bool]:
    """The result (us) and whether it was scaled, decided by the protocol's own code."""
    windows = [_Window(before, times, after) for before, times, after in row["windows"]]
    chosen, _, scaled = _chosen_samples(windows, _Probe(row["floor_us"], tolerance), samples)
    return statistics.median(t for times in chosen for t in times) * 1e3, scaled


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


def report(data: dict) -> None:
    rows = data["measurements"]
    plain = [statistics.median(t for w in r["windows"] for t in w[1]) * 1e3 for r in rows]
    normal = statistics.median(plain)
    print(f"{data['task']}, {len(rows)} measurements: normal speed {normal:.1f} us "
          f"(median of plain medians, CV {cv(plain):.2%})")
    print("1. model window median / normal, by probe reading / floor (both sides' mean):")
    groups: dict[int, list[float]] = {}
    for r in rows:
        for before, times, after in r["windows"]:
            reading = (before + after) / 2 / r["floor_us"]
            group = next(i for i in range(len(EDGES) - 1) if reading < EDGES[i + 1])
            groups.setdefault(group, []).append(statistics.median(times) * 1e3 / normal)
    for i in sorted(groups):
        ratios = sorted(groups[i])
        print(f"   probe {EDGES[i]:.2f}-{EDGES[i + 1]:.2f}x: {len(ratios):5d} windows, model "
              f"{statistics.median(ratios):.3f}x (p10 {ratios[len(ratios) // 10]:.3f}, "
              f"p90 {ratios[9 * len(ratios) // 10]:.3f})")
    print("2. replayed at each quiet tolerance:")
    for tolerance in TOLERANCES:
        results = [replay(r, tolerance) for r in rows]
        values = [us for us, _ in results]
        print(f"   {tolerance:.2f}: CV {cv(values):.2%}, scaled {sum(s for _, s in results)}/"
              f"{len(results)}, more than 3% from normal "
              f"{sum(abs(v / normal - 1) > 0.03 for v in values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits-cnn")
    parser.add_argument("--measurements", type=int, default=200)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--load", type=Path)
    args = parser.parse_args()
    data = (json.loads(args.load.read_text()) if args.load
            else measure(args.task, args.measurements))
    if args.save:
        args.save.write_text(json.dumps(data))
    report(data)


if __name__ == "__main__":
    main()
