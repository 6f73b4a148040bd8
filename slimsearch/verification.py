"""An exported bundle re-measured in a fresh process, side by side with the search's numbers.

``verify_in_fresh_process`` starts ``python -m slimsearch.verification BUNDLE RUN_DIR``: a new
interpreter (nothing cached from the search) loads the run's task and target, materializes the
bundle's model file with the bundle's runtime into a temporary folder, checks that this gives
the bundled executable file byte for byte (so what it then measures *is* that file), and
measures validation and test accuracy, the file's bytes and latency exactly as the search did:
on the CPU, timed against the run's teacher in the same moments, and multiplied by the
teacher's latency at rest from the start of the run (``timing.paired``; for a runtime the
search did not measure, the teacher's latency at rest is measured anew here).
Accuracy and size must be equal; latency may differ by ``tolerance`` (a fraction of the
search's figure). A fresh latency outside it is measured again in another fresh process, up
to ``LATENCY_ATTEMPTS`` in all, since a shared machine can be disturbed for seconds; every
attempt is recorded.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

LATENCY_ATTEMPTS = 3
DEFAULT_TOLERANCE = 0.10
#: A fresh re-measurement evaluates the test and validation sets and times the model: minutes
#: at most for the models this tool compresses; past this, something hangs (seconds).
FRESH_PROCESS_TIMEOUT_S = 3600
COMPARED = ("val_accuracy", "test_accuracy", "size_bytes", "latency_ms")


def check_tolerance(tolerance: float) -> None:
    """``ConfigError`` unless ``tolerance`` is a finite fraction >= 0."""
    from slimsearch.errors import ConfigError

    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"--tolerance {tolerance}: give how far the fresh latency may be from "
                          "the search's as a fraction >= 0, e.g. 0.10 for 10%")


def remeasure(bundle: Path, run_dir: Path) -> dict[str, Any]:
    """(In the fresh process.) The bundle's figures, measured like a trial's."""
    import dataclasses

    from slimsearch.compression import MODEL_FILE, load_float_model
    from slimsearch.devices import computing, resolve_device
    from slimsearch.evaluators import EvalContext, evaluate, reference_at_rest
    from slimsearch.manifest import check_bundle, sha256
    from slimsearch.run.folder import RunFolder
    from slimsearch.runtimes import get_runtime
    from slimsearch.tasks import make_task

    manifest = check_bundle(bundle, exported=True)  # what is measured is what it promises
    config = RunFolder(run_dir).config()
    target = dataclasses.replace(config.target, runtime=manifest["runtime"])
    task = make_task(config.task, seed=config.seed, base_dir=config.base_dir,
                     metrics=config.metrics,
                     options=config.task_options)
    device = resolve_device(target.device)
    runtime = get_runtime(manifest["runtime"])
    with tempfile.TemporaryDirectory() as folder, computing(device):
        model_file = Path(folder) / MODEL_FILE
        model_file.write_bytes((bundle / MODEL_FILE).read_bytes())
        executable = runtime.materialize(model_file, target=target, device=device,
                                         out_dir=Path(folder),
                                         example=task.example_inputs(target.batch_size))
        same_file = sha256(executable.artifact) == manifest["files"][manifest["artifact"]]
        reference = None
        if device.type == "cpu":  # the run's teacher, as the search timed every trial
            teacher = RunFolder(run_dir).teacher
            (Path(folder) / "teacher").mkdir()
            teacher_exe = runtime.materialize(
                teacher / MODEL_FILE, target=target, device=device,
                out_dir=Path(folder) / "teacher", example=task.example_inputs(target.batch_size))
            reference = _run_anchor(teacher, teacher_exe, target, manifest["runtime"])
            if reference is None:  # another runtime than the search's: its teacher anew
                reference = reference_at_rest(teacher_exe, task, target)
        context = EvalContext(task=task, executable=executable,
                              model=load_float_model(model_file), target=target,
                              device=device, latency_cache=None, reference=reference,
                              batch_sizes=target.batch_sizes[:1])  # only the objective's is compared
        metrics = evaluate(context)
    first_batch = {k: v for k, v in metrics.items()  # the objective's latency_* figures
                   if k.startswith("latency_") and not re.match(r"latency_b\d+_", k)}
    return {**{k: metrics[k] for k in COMPARED}, "latency_cv": metrics["latency_cv"],
            "latency": first_batch,
            "same_executable_file": same_file, "runtime": manifest["runtime"],
            "device": str(device)}


def _run_anchor(teacher: Path, executable: Any, target: Any, runtime: str) -> Any:
    """The run's teacher as the reference, with its latencies at rest from the start of the
    run, when the search measured them on this runtime (else None). Like every trial and the
    confirmation pass, the fresh figure is then a ratio measured now times the run's one
    anchor: timed alone in another process, the same file read 1.5x apart on this VM."""
    from slimsearch.atomic import read_json
    from slimsearch.evaluators import reference_from_metrics

    metrics_file = teacher / "metrics.json"
    metrics = read_json(metrics_file) if metrics_file.is_file() else {}
    if metrics.get("runtime", "torch") != runtime or "latency_ms" not in metrics:
        return None
    return reference_from_metrics(executable, metrics, target.batch_sizes)


def _fresh(bundle: Path, run_dir: Path) -> dict[str, Any]:
    # -P: the current directory is not put on the module path, so no file lying there can
    # stand in for a module the run or the bundle's model file names
    done = subprocess.run([sys.executable, "-P", "-m", "slimsearch.verification", str(bundle),
                           str(run_dir)], capture_output=True, text=True,
                          timeout=FRESH_PROCESS_TIMEOUT_S)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the fresh process that re-measures the bundle failed: {tail}")
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:  # something else printed last, or nothing
        raise RuntimeError("the fresh process that re-measures the bundle did not print its "
                           f"figures: {done.stdout[-500:]!r}") from exc


def verify_in_fresh_process(bundle: Path, run_dir: Path, search: dict[str, Any] | None, *,
                            tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """The contents of ``verification.json``: the search's figures, the fresh ones, each
    check and whether all passed. ``search`` None: the bundle is in a runtime the search did
    not measure; its fresh figures are recorded, only the rebuilt file is checked."""
    attempts = [_fresh(bundle, run_dir)]
    if search is None:
        fresh = attempts[0]
        checks = {"same_executable_file": fresh["same_executable_file"]}
        return {"passed": all(checks.values()), "checks": checks, "compared": False,
                "note": "the search measured another runtime: these are this runtime's first "
                        "figures, not a promise it kept",
                "fresh": {k: fresh[k] for k in COMPARED}, "runtime": fresh["runtime"],
                "device": fresh["device"]}
    while (abs(attempts[-1]["latency_ms"] / search["latency_ms"] - 1) > tolerance
           and len(attempts) < LATENCY_ATTEMPTS):
        attempts.append(_fresh(bundle, run_dir))
    fresh = min(attempts, key=lambda a: abs(a["latency_ms"] / search["latency_ms"] - 1))
    checks = {
        "val_accuracy": fresh["val_accuracy"] == search["val_accuracy"],
        "test_accuracy": fresh["test_accuracy"] == search["test_accuracy"],
        "size_bytes": fresh["size_bytes"] == search["size_bytes"],
        "latency_ms": abs(fresh["latency_ms"] / search["latency_ms"] - 1) <= tolerance,
        "same_executable_file": fresh["same_executable_file"],
    }
    return {"passed": all(checks.values()), "checks": checks, "compared": True,
            "tolerance": tolerance, "search": {k: search[k] for k in COMPARED},
            "fresh": {k: fresh[k] for k in COMPARED},
            "latency_ratio": round(fresh["latency_ms"] / search["latency_ms"], 4),
            "latency_attempts": [a["latency_ms"] for a in attempts],
            "fresh_latency": fresh.get("latency", {}),  # every latency_* figure of the kept attempt
            "runtime": fresh["runtime"], "device": fresh["device"]}


if __name__ == "__main__":
    print(json.dumps(remeasure(Path(sys.argv[1]), Path(sys.argv[2]))))
