"""Does a busy machine put a wrong latency on the front? (issue 16)

    python benchmarks/latency_under_load.py [--runs digits_mlp:20 digits_cnn:10]
        [--batch-sizes 256 1] [--out DIR]

Each shipped experiment is searched twice through the command line, in fresh run folders:
``quiet`` (nothing else of ours running) and ``loaded``: from the moment the teacher has been
measured at rest until the search ends, one busy process (a pure-Python loop, pinned to the
second core) runs for 10 s, pauses for 10 s, and so on: half of the run under load. Then, with
the machine quiet again, every Pareto trial of each run is measured once more the way the
search defines a latency: its ratio to the teacher, timed in the same moments, times the
teacher's latency at rest from the start of that run, to a 2% interval (the confirmation
pass's). ``--batch-sizes`` replaces the experiments' target batch sizes (the first is the
objective, the one compared).

It prints, per run: each Pareto trial's search latency and quiet re-measurement, the largest
relative error (goal: none more than 10% below), and whether the front's order by latency
changed. Finally the fastest Pareto trial of each loaded run is exported with the default
tolerance and its fresh-process verification printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY_ON_S = BUSY_OFF_S = 10.0


def _busy_cycle(stop: threading.Event) -> None:
    """One busy process pinned to the second core, on for BUSY_ON_S, off for BUSY_OFF_S."""
    while not stop.is_set():
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
                os.sched_setaffinity(busy.pid, {1})
            stop.wait(BUSY_ON_S)
        finally:
            busy.kill()
            busy.wait()
        stop.wait(BUSY_OFF_S)


def experiment_file(experiment: str, batch_sizes: list[int] | None, out: Path) -> Path:
    """The shipped experiment, or a copy in ``out`` with its target batch sizes replaced."""
    shipped = ROOT / "experiments" / f"{experiment}.toml"
    if not batch_sizes:
        return shipped
    text, count = re.subn(r"(?m)^batch_sizes = \[[^\]]*\]", f"batch_sizes = {batch_sizes}",
                          shipped.read_text())
    if count != 1:
        raise SystemExit(f"{shipped}: no single 'batch_sizes = [...]' line to replace")
    copy = out / f"{experiment}-b{'-'.join(map(str, batch_sizes))}.toml"
    copy.write_text(text)
    return copy


def search(experiment: Path, trials: int, run_dir: Path, *, loaded: bool) -> float:
    """Run the search (with the load from the teacher's line on); its wall-clock seconds."""
    begin = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "slimsearch", "run", str(experiment),
         "--trials", str(trials), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, text=True, cwd=run_dir.parent)
    stop, cycle = threading.Event(), None
    try:
        for line in process.stdout:
            if loaded and cycle is None and line.startswith("teacher ("):
                cycle = threading.Thread(target=_busy_cycle, args=(stop,), daemon=True)
                cycle.start()
        if process.wait() != 0:
            raise SystemExit(f"the {experiment} search failed")
    finally:
        stop.set()
        if cycle is not None:
            cycle.join()
        process.kill()
    return time.monotonic() - begin


def remeasure(run_dir: Path) -> list[dict]:
    """Every Pareto trial: the search's latency, and its ratio to the teacher measured now
    (quiet) times the run's anchor."""
    import torch

    from slimsearch.confirm import PRECISION
    from slimsearch.evaluators import reference_from_metrics
    from slimsearch.report.data import load_report_data
    from slimsearch.runtimes import load_model
    from slimsearch.tasks import make_task
    from slimsearch.timing.paired import measure_paired

    data = load_report_data(run_dir)
    config = json.loads((run_dir / "run.json").read_text())["experiment"]
    task = make_task(config["task"], seed=config["seed"])
    batch_sizes = config["target"]["batch_sizes"]
    x = task.example_inputs(batch_sizes[0])
    teacher = load_model(run_dir / "teacher" / "model.safetensors").eval()
    # the teacher, or a slice of its batch, and its latency there at the start of the run
    reference = reference_from_metrics(_Plain(teacher), data.teacher, batch_sizes)
    anchor, teacher_x = reference.anchor_ms[batch_sizes[0]], reference.inputs(task, batch_sizes[0])
    rows = []
    for t in data.pareto:
        model = load_model(run_dir / "trials" / f"{t.number:05d}" / "model.safetensors").eval()
        with torch.inference_mode():
            quiet = measure_paired(model, x, teacher, teacher_x,
                                   precision=PRECISION).ratio * anchor
        rows.append({"trial": t.number, "search_ms": t.metrics["latency_ms"], "quiet_ms": quiet,
                     "error": t.metrics["latency_ms"] / quiet - 1,
                     "unstable": bool(t.metrics.get("latency_unstable")),
                     "confirmed_ms": (data.confirmed or {}).get("trials", {}).get(
                         str(t.number), {}).get("latency_ms")})
    return rows


class _Plain:
    """A loaded model as ``reference_from_metrics`` takes an executable."""

    def __init__(self, model: object) -> None:
        self.run = model

    def native(self, x: object) -> object:
        return x


def order_changed(rows: list[dict]) -> bool:
    """Whether the Pareto trials' order by latency differs between the search's figures and
    the quiet ones, among trials whose quiet figures differ by more than 5% (closer ones are
    a tie either way)."""
    for a in rows:
        for b in rows:
            if (a["search_ms"] < b["search_ms"] and a["quiet_ms"] > 1.05 * b["quiet_ms"]):
                return True
    return False


def export_fastest(run_dir: Path, out: Path) -> dict:
    """Export the Pareto trial with the lowest search latency, --strict, default tolerance."""
    from slimsearch.report.data import load_report_data

    fastest = min(load_report_data(run_dir).pareto, key=lambda t: t.metrics["latency_ms"]).number
    done = subprocess.run([sys.executable, "-m", "slimsearch", "export", str(run_dir), "--trial",
                           str(fastest), "--out", str(out), "--strict"],
                          capture_output=True, text=True)
    verification = json.loads((out / "verification.json").read_text())
    return {"trial": fastest, "exit": done.returncode, "passed": verification["passed"],
            "latency_ratio": verification.get("latency_ratio"),
            "attempts": verification.get("latency_attempts")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", default=["digits_mlp:20", "digits_cnn:10"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="latency-under-load-"))
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for spec in args.runs:
        experiment, trials = spec.split(":")
        toml = experiment_file(experiment, args.batch_sizes, out)
        for mode in ("quiet", "loaded"):
            run_dir = out / f"{experiment}-{mode}"
            seconds = search(toml, int(trials), run_dir, loaded=mode == "loaded")
            time.sleep(2)
            rows = remeasure(run_dir)
            worst = min(rows, key=lambda r: r["error"])
            largest = max(rows, key=lambda r: abs(r["error"]))
            summary[f"{experiment}-{mode}"] = {
                "seconds": round(seconds), "pareto": len(rows),
                "most_below": round(worst["error"], 4), "largest_abs": round(largest["error"], 4),
                "order_changed": order_changed(rows),
                "unstable": sum(r["unstable"] for r in rows)}
            print(f"{experiment} {mode}: {int(trials)} trials in {seconds:.0f} s, "
                  f"{len(rows)} Pareto trials")
            for r in rows:
                confirmed = (f", confirmed {r['confirmed_ms']:.4f}" if r["confirmed_ms"]
                             else "")
                print(f"  trial {r['trial']:3d}: search {r['search_ms']:.4f} ms, quiet "
                      f"{r['quiet_ms']:.4f} ms ({r['error']:+.1%}){confirmed}"
                      f"{' UNSTABLE' if r['unstable'] else ''}")
            print(f"  largest error {largest['error']:+.1%}, most below {worst['error']:+.1%}, "
                  f"order by latency changed: {summary[f'{experiment}-{mode}']['order_changed']}",
                  flush=True)
        exported = export_fastest(out / f"{experiment}-loaded", out / f"{experiment}-bundle")
        summary[f"{experiment}-export"] = exported
        print(f"{experiment} loaded run, fastest Pareto trial {exported['trial']} exported "
              f"--strict: exit {exported['exit']}, verification passed {exported['passed']}, "
              f"fresh/search latency {exported['latency_ratio']} (attempts "
              f"{exported['attempts']})", flush=True)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
