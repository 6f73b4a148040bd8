"""Re-measure an exported bundle in a fresh process and print it beside the search's numbers.

    python benchmarks/remeasure.py RUN_DIR BUNDLE

The bundle's model file is materialized by the run's own target (device, runtime, dtype,
batch sizes, threads) with the same code a trial uses, in this new process, then measured:
accuracy and size must be equal; latency is printed side by side with its ratio. Exit code 1
when accuracy or size differ, or latency differs by more than --tolerance (a fraction).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from slimsearch.atomic import read_json
from slimsearch.compression import MODEL_FILE
from slimsearch.devices import resolve_device
from slimsearch.experiment import load_experiment
from slimsearch.search.objective import TrialRunner
from slimsearch.tasks import make_task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args()
    config = load_experiment(args.run_dir / "experiment.toml")
    task = make_task(config.task, seed=config.seed, base_dir=config.base_dir)
    device = resolve_device(config.target.device)
    searched = read_json(args.bundle / "metrics.json")
    runner = TrialRunner(config=config, task=task, teacher=None, device=device)
    with tempfile.TemporaryDirectory() as folder:
        model_file = Path(folder) / MODEL_FILE
        shutil.copyfile(args.bundle / MODEL_FILE, model_file)
        fresh = runner.measure(model_file)
    print(f"target: {config.target.runtime} on {device}, {config.target.dtype}, "
          f"batch {list(config.target.batch_sizes)}")
    print(f"{'metric':<22}{'search':>14}{'fresh process':>16}{'fresh/search':>14}")
    failed = []
    # a search times a trial at the objective's batch size only (the others, for the front,
    # in the confirmation pass); a bundle from before that carries them all
    latency_keys = [k for k in searched if k.startswith("latency") and k.endswith("_ms")
                    and k in fresh]
    for key in ["val_accuracy", "test_accuracy", "size_bytes", *latency_keys]:
        a, b = searched[key], fresh[key]
        print(f"{key:<22}{a:>14.6g}{b:>16.6g}{b / a if a else float('nan'):>14.3f}")
        exact = key in ("val_accuracy", "test_accuracy", "size_bytes")
        if (exact and a != b) or (not exact and key == "latency_ms"
                                  and abs(b / a - 1) > args.tolerance):
            failed.append(key)
    print("MISMATCH: " + ", ".join(failed) if failed else "OK: the bundle reproduces the search's "
          f"accuracy and size exactly, and latency within {args.tolerance:.0%}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
