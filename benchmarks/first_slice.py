"""Check the first slice's promise end to end and print the figures for RESULTS.md.

    python benchmarks/first_slice.py [--experiment experiments/digits_mlp.toml] [--trials 20]

Runs `slimsearch run` in a fresh run folder (a subprocess, timed by the wall clock), then reads
pareto.json and checks: >= 3 Pareto trials; at least one >= 4x smaller than the teacher (real
bytes) with <= 1.5 points lower test accuracy; and `slimsearch export` + `load_model` in a fresh
Python process reproduces that trial's test accuracy exactly.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SLIMSEARCH = [sys.executable, "-m", "slimsearch.cli"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/digits_mlp.toml")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slimsearch-bench-"))
    run_dir = work / "run"
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"torch threads, python {platform.python_version()}, torch {torch.__version__}")

    start = time.perf_counter()
    subprocess.run([*SLIMSEARCH, "run", args.experiment, "--trials", str(args.trials),
                    "--run-dir", str(run_dir)], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    pareto = json.loads((run_dir / "pareto.json").read_text())
    teacher = pareto["teacher"]
    print(f"search: {args.trials} trials in {wall:.1f} s wall clock (teacher training included)")
    print(f"teacher: val {teacher['val_accuracy']:.4f}, test {teacher['test_accuracy']:.4f}, "
          f"{teacher['size_bytes']} bytes, {teacher['latency_ms']:.4f} ms")
    print("Pareto trials (trial, val acc, test acc, bytes, x smaller, latency ms, cv, recipe):")
    good = []
    for entry in pareto["trials"]:
        m = entry["metrics"]
        ratio = teacher["size_bytes"] / m["size_bytes"]
        drop = (teacher["test_accuracy"] - m["test_accuracy"]) * 100
        print(f"  {entry['number']:3d}  {m['val_accuracy']:.4f}  {m['test_accuracy']:.4f}  "
              f"{m['size_bytes']:7d}  {ratio:6.1f}x  {m['latency_ms']:.4f}  {m['latency_cv']:.2f}  "
              f"{entry['baseline'] or ''}")
        if ratio >= 4 and drop <= 1.5:
            good.append((ratio, entry))

    checks = {"at least 3 Pareto trials": len(pareto["trials"]) >= 3,
              ">= 4x smaller with <= 1.5 points lower test accuracy": bool(good)}
    if good:
        ratio, best = max(good, key=lambda g: g[0])
        bundle = work / "bundle"
        subprocess.run([*SLIMSEARCH, "export", str(run_dir), "--trial", str(best["number"]),
                        "--out", str(bundle)], check=True, stdout=subprocess.DEVNULL)
        experiment = json.loads((run_dir / "run.json").read_text())["experiment"]
        probe = (f"import slimsearch, torch\n"
                 f"from slimsearch.tasks import make_task\n"
                 f"from slimsearch.training import accuracy\n"
                 f"m = slimsearch.load_model({str(bundle)!r})\n"
                 f"t = make_task({experiment['task']!r}, seed={experiment['seed']})\n"
                 f"print(repr(accuracy(m, t.test, device=torch.device('cpu'))))\n")
        fresh = float(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                     text=True).stdout)
        print(f"exported trial {best['number']} ({ratio:.1f}x smaller): test accuracy in the search "
              f"{best['metrics']['test_accuracy']!r}, in a fresh process {fresh!r}")
        checks["fresh-process test accuracy identical"] = fresh == best["metrics"]["test_accuracy"]
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
