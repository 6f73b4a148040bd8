"""Does a change to the code change what a search finds? (issue 15: behaviour unchanged)

    python benchmarks/same_results.py OUT.json [--runs digits_mlp:20 digits_cnn:10]
    python benchmarks/same_results.py --compare BEFORE.json AFTER.json

Each shipped experiment runs in a fresh folder through the command line, with
``search.sampler = "random"``. Its trials are written to OUT.json: state, recipe, validation
and test accuracy, file bytes, and whether the trial ran on int8 kernels. ``--compare``
prints which figures differ between two such files.

Run it once per version, e.g. with another checkout first on the path:
``PYTHONPATH=/tmp/before python benchmarks/same_results.py before.json``.

The random sampler is used because TPE's proposals after its startup trials depend on the
latencies it was told, and those vary between any two runs on a shared machine. The random
sampler's proposals do not depend on them, so the recipes must match exactly. Accuracy and
size can still move between two runs of the same code wherever the int8 plan is chosen by
timing: a layer runs on int8 kernels only where it was measured faster, and the model file
records that choice.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("state", "recipe", "val_accuracy", "test_accuracy", "size_bytes", "int8_layers")


def run(experiment: str, trials: int, folder: Path) -> list[dict]:
    """The trials of one random-sampler search of ``experiments/<experiment>.toml``."""
    text = (ROOT / "experiments" / f"{experiment}.toml").read_text()
    text, replaced = re.subn(r'(?m)^sampler\s*=\s*"[^"]*"', 'sampler = "random"', text)
    if not replaced:
        text = text.replace("[search]\n", '[search]\nsampler = "random"\n', 1)
    copy = folder / f"{experiment}.toml"
    copy.write_text(text)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "slimsearch", "run", str(copy), "--run-dir",
                    str(folder / experiment), "--trials", str(trials)], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(f"{experiment}: {trials} trials in {time.perf_counter() - start:.0f} s")
    found = []
    for trial in sorted((folder / experiment / "trials").iterdir()):
        metrics_file = trial / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        recipe = json.loads((trial / "recipe.json").read_text()) if (
            trial / "recipe.json").exists() else None
        found.append({"number": int(trial.name), "state": "COMPLETE" if metrics else "other",
                      "recipe": recipe, **{k: metrics.get(k) for k in FIGURES[2:]}})
    return found


def compare(before: dict, after: dict) -> int:
    """Print the differences; the number of trials that differ in recipe, accuracy or size."""
    differing = 0
    for experiment in before:
        old = {t["number"]: t for t in before[experiment]}
        new = {t["number"]: t for t in after.get(experiment, [])}
        same = {k: 0 for k in FIGURES}
        for number in sorted(set(old) | set(new)):
            a, b = old.get(number, {}), new.get(number, {})
            changed = [k for k in FIGURES if a.get(k) != b.get(k)]
            for k in FIGURES:
                same[k] += k not in changed
            if changed:
                differing += 1
                print(f"  {experiment} trial {number}: " + ", ".join(
                    f"{k} {a.get(k)!r:.60} -> {b.get(k)!r:.60}" for k in changed))
        total = len(set(old) | set(new))
        print(f"{experiment}: {total} trials; the same in " + ", ".join(
            f"{k} {same[k]}/{total}" for k in FIGURES))
    return differing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="JSON file to write")
    parser.add_argument("--runs", nargs="+", default=["digits_mlp:20", "digits_cnn:10"],
                        help="experiment:trials pairs (default digits_mlp:20 digits_cnn:10)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        differing = compare(before, after)
        print(f"{differing} trials differ in a recipe, an accuracy or a size")
        return 0
    if not args.out:
        parser.error("give OUT.json, or --compare BEFORE AFTER")
    import slimsearch

    print(f"slimsearch from {Path(slimsearch.__file__).parent}")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for item in args.runs:
            experiment, _, trials = item.partition(":")
            results[experiment] = run(experiment, int(trials), Path(folder))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
