"""Export a trial: a bundle folder that ``load_model`` accepts and a manifest that proves it.

    bundle/
      model.safetensors   the model file the trial was built into (byte for byte)
      model.onnx | model.torchscript.pt   the runtime's own file, when the target's runtime
                          is onnxruntime or torchscript: what was sized and timed
      recipe.json         how it was built          metrics.json   the bundled file's figures
      environment.json    versions and seed         manifest.json  sha256 of every file
      verification.json   the bundle re-measured in a fresh process, beside the search's figures
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import torch

from slimsearch.atomic import read_json, write_json
from slimsearch.compression import MODEL_FILE, read_header
from slimsearch.devices import resolve_device
from slimsearch.errors import ArtifactError, ConfigError, TrialError
from slimsearch.experiment import ExperimentConfig, TargetConfig
from slimsearch.manifest import sha256
from slimsearch.run import load_study
from slimsearch.run.folder import RunFolder
from slimsearch.runtimes import get_runtime
from slimsearch.tasks import make_task
from slimsearch.verification import (
    COMPARED,
    DEFAULT_TOLERANCE,
    check_tolerance,
    verify_in_fresh_process,
)

BUNDLE_FILES = (MODEL_FILE, "recipe.json", "metrics.json", "environment.json")


def export_trial(run_dir: str | Path, trial: int, out: str | Path, *, verify: bool = True,
                 tolerance: float = DEFAULT_TOLERANCE, runtime: str | None = None,
                 strict: bool = False) -> tuple[Path, dict | None]:
    """Copy trial ``trial`` of the run in ``run_dir`` into the bundle folder ``out`` and (with
    ``verify``) re-measure it in a fresh process; return the bundle and ``verification.json``.

    ``runtime``: the executable form to bundle; by default the run's. Another runtime's file
    is built from the trial's model file here; the search measured none of its figures, so
    its verification records them without comparing, and the bundle's metrics.json holds
    those fresh figures (the search's, of the other runtime, under ``"search"``), never the
    other runtime's as if they were this file's.

    Refuses trials that did not complete and an ``out`` folder that already holds files.
    The bundle is assembled in a temp folder and renamed into place, so it is never partial.
    A bundle that fails verification is still written (its verification.json says how it
    differs); the caller reports the failure. When only the latency differs (the machine was
    busier or quieter than during the search) and not ``strict``, the bundle's metrics.json
    takes the fresh latency as its own, with the search's beside it, and verification.json
    says so (``latency_adopted``).
    """
    folder = RunFolder(Path(run_dir))
    check_tolerance(tolerance)
    source = _completed_trial(folder, trial)
    metrics = read_json(source / "metrics.json")
    searched = metrics.get("runtime", "torch")
    runtime = runtime or searched
    config = folder.config()
    target = dataclasses.replace(config.target, runtime=runtime)
    device = resolve_device(target.device)
    if runtime != searched:  # another runtime: refuse what it cannot run before copying anything
        get_runtime(runtime).check(target, device)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new folder")
    read_header(source / MODEL_FILE)  # a corrupt file fails here, before anything is written
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        files = _stage(staging, source, metrics, runtime == searched, config, target, device)
        manifest = {"format": "slimsearch.bundle", "version": 1, "run": str(folder.root.resolve()),
                    "trial": trial, "runtime": runtime, "artifact": files[-1]}
        _write_manifest(staging, manifest, files)
        verification = None
        if verify:
            verification = verify_in_fresh_process(
                staging, folder.root, metrics if runtime == searched else None, tolerance=tolerance)
            if not strict and _only_latency_differs(verification):
                verification["latency_adopted"] = True
                write_json(staging / "metrics.json", _fresh_latency_metrics(
                    metrics, verification, verification["fresh_latency"]))
            write_json(staging / "verification.json", verification)
            files.append("verification.json")
        if runtime != searched:
            write_json(staging / "metrics.json", _other_runtime_metrics(
                metrics, runtime=runtime, artifact=manifest["artifact"], verification=verification))
        _write_manifest(staging, manifest, files)
    except (TrialError, RuntimeError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(staging, ignore_errors=True)  # never a half-written bundle
        raise ArtifactError(f"cannot export trial {trial}: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return out, verification


def _only_latency_differs(verification: dict) -> bool:
    return (verification.get("compared", False) and not verification["passed"]
            and [k for k, ok in verification["checks"].items() if not ok] == ["latency_ms"])


def _fresh_latency_metrics(metrics: dict, verification: dict, fresh: dict) -> dict:
    """The trial's metrics with the fresh latency figures (``fresh``: the objective's
    ``latency_*``, from the verifying process) as the bundle's own, and the search's figure
    beside them: the file is the same, only the moment it was timed in differs."""
    new, searched = verification["fresh"]["latency_ms"], metrics["latency_ms"]
    adopted = {**metrics, **{k: v for k, v in fresh.items() if k not in (
        "latency_cached", "latency_signature")}, "latency_ms": new, "latency_search_ms": searched,
               "latency_note": (f"re-measured at export: {new:.4g} ms against the search's "
                                f"{searched:.4g} ms ({new / searched - 1:+.0%}); accuracy, size "
                                "and the executable file were reproduced exactly")}
    # the teacher at rest, measured with it (when it ran at the same batch, not a slice)
    teacher_ms = (fresh.get("latency_anchor_ms")
                  if fresh.get("latency_reference_batch") == fresh.get("latency_batch_size")
                  else None)
    if "speedup" in metrics:
        adopted["speedup"] = round(teacher_ms / new if teacher_ms
                                   else metrics["speedup"] * searched / new, 4)
        adopted["slower_than_teacher"] = adopted["speedup"] < 1.0
    return adopted


def _completed_trial(folder: RunFolder, trial: int) -> Path:
    """The folder of completed trial ``trial``, with every file a bundle takes from it."""
    numbers = {t.number: t for t in load_study(folder.root).get_trials(deepcopy=False)}
    if trial not in numbers:
        raise ConfigError(f"--trial {trial}: the run has trials 0 to {len(numbers) - 1}; see the "
                          "report's table for the Pareto-optimal ones")
    if numbers[trial].state.name != "COMPLETE":
        raise ConfigError(f"--trial {trial} is {numbers[trial].state.name}, not COMPLETE; pick a "
                          "completed trial from the report")
    if (original := numbers[trial].user_attrs.get("duplicate_of")) is not None:
        raise ConfigError(f"--trial {trial} drew the recipe of trial {original} again and was "
                          f"answered with its figures, nothing built: export --trial {original}")
    source = folder.trial(trial)
    missing = [name for name in BUNDLE_FILES if not (source / name).is_file()]
    if missing:
        raise ConfigError(f"--trial {trial}: its folder {source} lacks {', '.join(missing)} (deleted "
                          "or not copied with the run folder); restore the folder, or export "
                          "another completed trial")
    return source


def _stage(staging: Path, source: Path, metrics: dict, searched: bool, config: ExperimentConfig,
           target: TargetConfig, device: torch.device) -> list[str]:
    """Copy the trial's files into ``staging`` with the runtime's executable file: the
    search's own (``searched``) or, for another runtime, one built here from the model file.
    Return the bundle's file names, the executable file last."""
    files = list(BUNDLE_FILES)
    for name in files:
        shutil.copyfile(source / name, staging / name)
    if searched:
        artifact = metrics.get("artifact_file", MODEL_FILE)
        if artifact != MODEL_FILE:
            shutil.copyfile(source / artifact, staging / artifact)
    else:
        task = make_task(config.task, seed=config.seed, base_dir=config.base_dir,
                     metrics=config.metrics,
                     options=config.task_options)
        artifact = get_runtime(target.runtime).materialize(
            staging / MODEL_FILE, target=target, device=device, out_dir=staging,
            example=task.example_inputs(target.batch_size)).artifact.name
    return [name for name in files if name != artifact] + [artifact]


def _write_manifest(staging: Path, manifest: dict, files: list[str]) -> None:
    write_json(staging / "manifest.json",
               {**manifest, "files": {name: sha256(staging / name) for name in files}})


def _other_runtime_metrics(searched: dict, *, runtime: str, artifact: str,
                           verification: dict | None) -> dict:
    """metrics.json of a bundle in a runtime the search did not measure: this file's figures
    from the fresh process (none with --no-verify), the search's own under ``search``."""
    fresh = verification["fresh"] if verification else {}
    return {**fresh, "runtime": runtime, "artifact_file": artifact,
            "measured": ("in a fresh process at export" if verification
                         else "not measured (exported with --no-verify)"),
            "search": {"runtime": searched.get("runtime", "torch"),
                       **{k: searched[k] for k in COMPARED if k in searched}}}
