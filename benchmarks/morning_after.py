"""The morning after a digits-cnn search, checked end to end (issue 6).

    python benchmarks/morning_after.py [--trials 30] [--run-dir runs/morning_after]

1. A digits-cnn search (experiments/digits_cnn.toml) to --trials, continued if the folder
   already holds one.
2. report.html opened in headless Chromium: JavaScript errors, plots drawn, sections present.
3. `slimsearch pick --max-latency-ms X` (X: the median latency of the completed trials)
   against brute force over every completed trial.
4. `slimsearch export` of that trial: verification.json side by side with the search.
5. The bundle with one byte of its model file flipped: load_model and `slimsearch verify`
   must refuse it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("Summary", "Pareto front", "Pareto-optimal trials", "All three objectives",
            "Search progress", "Per-layer choices", "Which parameters matter", "Layer sensitivity")


def slimsearch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimsearch", *args], capture_output=True,
                          text=True, cwd=ROOT)


def browser_check(page: Path) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return "Chromium not installed: browser check skipped"
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-background-networking", "--no-first-run",
                               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                               "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                              capture_output=True, text=True, timeout=180)
    errors = [line for line in done.stderr.splitlines() if ":CONSOLE" in line
              and re.search(r"Uncaught|Error", line) and "GL Driver" not in line]
    drawn = len(re.findall(r'<div[^>]*class="[^"]*\bjs-plotly-plot\b', done.stdout))
    missing = [s for s in SECTIONS if s not in done.stdout]
    return (f"report in headless Chromium: {drawn} plots drawn, {len(errors)} script errors, "
            f"sections missing: {missing or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "morning_after")
    args = parser.parse_args()
    run = slimsearch("run", "experiments/digits_cnn.toml", "--trials", str(args.trials),
                     "--run-dir", str(args.run_dir))
    assert run.returncode == 0, run.stderr
    print(run.stdout.strip().splitlines()[-2])
    print(browser_check(args.run_dir / "report.html"))

    sys.path.insert(0, str(ROOT))
    from slimsearch.report.data import load_report_data

    completed = load_report_data(args.run_dir).completed
    limit = statistics.median(t.metrics["latency_ms"] for t in completed)
    fits = [t for t in completed if t.metrics["latency_ms"] <= limit]
    brute = min(fits, key=lambda t: (-t.metrics["val_accuracy"], t.metrics["size_bytes"],
                                     t.metrics["latency_ms"])).number
    picked = slimsearch("pick", str(args.run_dir), "--max-latency-ms", f"{limit:.6f}")
    print(picked.stdout.strip())
    chosen = int(re.match(r"picked trial (\d+):", picked.stdout).group(1))
    print(f"pick --max-latency-ms {limit:.6f}: trial {chosen}; brute force over "
          f"{len(completed)} completed trials: trial {brute} -> "
          f"{'same' if chosen == brute else 'DIFFERENT'}")

    with tempfile.TemporaryDirectory() as folder:
        bundle = Path(folder) / "bundle"
        exported = slimsearch("export", str(args.run_dir), "--trial", str(chosen), "--out",
                              str(bundle))
        print(exported.stdout.strip())
        print(f"export exit code {exported.returncode}")
        verification = json.loads((bundle / "verification.json").read_text())
        print(f"verification.json: passed {verification['passed']}, latency ratio "
              f"{verification['latency_ratio']}, attempts {verification['latency_attempts']}")
        model = bundle / "model.safetensors"
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
        tampered = subprocess.run([sys.executable, "-c", "import slimsearch, sys; "
                                   f"slimsearch.load_model({str(bundle)!r})"],
                                  capture_output=True, text=True, cwd=ROOT)
        last = (tampered.stderr.strip().splitlines() or [""])[-1]
        print(f"tampered bundle: load_model exit code {tampered.returncode}: {last}")
        verify = slimsearch("verify", str(bundle), "--manifest-only")
        print(f"tampered bundle: slimsearch verify exit code {verify.returncode}: "
              f"{verify.stderr.strip()}")


if __name__ == "__main__":
    main()
