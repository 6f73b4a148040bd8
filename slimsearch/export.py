"""Export a trial: a bundle folder that ``load_model`` accepts and a manifest that proves it.

    bundle/
      model.safetensors   the model file the trial was built into (byte for byte)
      model.onnx | model.torchscript.pt   the runtime's own file, when the target's runtime
                          is onnxruntime or torchscript: what was sized and timed
      recipe.json         how it was built          metrics.json   what the search measured
      environment.json    versions and seed         manifest.json  sha256 of every file
      verification.json   the bundle re-measured in a fresh process, beside the search's figures
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from slimsearch.atomic import read_json, write_json
from slimsearch.compression import MODEL_FILE, read_header
from slimsearch.errors import ConfigError
from slimsearch.report.data import load_study
from slimsearch.search.run_folder import RunFolder
from slimsearch.verification import DEFAULT_TOLERANCE, verify_in_fresh_process

BUNDLE_FILES = (MODEL_FILE, "recipe.json", "metrics.json", "environment.json")


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_trial(run_dir: str | Path, trial: int, out: str | Path, *, verify: bool = True,
                 tolerance: float = DEFAULT_TOLERANCE) -> tuple[Path, dict | None]:
    """Copy trial ``trial`` of the run in ``run_dir`` into the bundle folder ``out`` and (with
    ``verify``) re-measure it in a fresh process; return the bundle and ``verification.json``.

    Refuses trials that did not complete and an ``out`` folder that already holds files.
    The bundle is assembled in a temp folder and renamed into place, so it is never partial.
    A bundle that fails verification is still written (its verification.json says how it
    differs); the caller reports the failure.
    """
    folder = RunFolder(Path(run_dir))
    study = load_study(folder.root)
    numbers = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial not in numbers:
        raise ConfigError(f"--trial {trial}: the run has trials 0 to {len(numbers) - 1}; see the "
                          "report's table for the Pareto-optimal ones")
    if numbers[trial].state.name != "COMPLETE":
        raise ConfigError(f"--trial {trial} is {numbers[trial].state.name}, not COMPLETE; pick a "
                          "completed trial from the report")
    source = folder.trial(trial)
    metrics = read_json(source / "metrics.json")
    files = list(BUNDLE_FILES)
    if metrics.get("artifact_file", MODEL_FILE) not in files:
        files.append(metrics["artifact_file"])
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new folder")
    read_header(source / MODEL_FILE)  # a corrupt file fails here, before anything is written
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in files:
        shutil.copyfile(source / name, staging / name)

    def write_manifest() -> None:
        write_json(staging / "manifest.json", {
            "format": "slimsearch.bundle", "version": 1, "run": str(folder.root.resolve()),
            "trial": trial, "runtime": metrics.get("runtime", "torch"),
            "artifact": metrics.get("artifact_file", MODEL_FILE),
            "files": {name: sha256(staging / name) for name in files}})

    write_manifest()
    verification = None
    if verify:
        verification = verify_in_fresh_process(staging, folder.root, metrics, tolerance=tolerance)
        write_json(staging / "verification.json", verification)
        files.append("verification.json")
        write_manifest()
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return out, verification


def verify_bundle(bundle: str | Path) -> dict:
    """Check every file of a bundle against its manifest; return the manifest."""
    bundle = Path(bundle)
    manifest = read_json(bundle / "manifest.json")
    for name, expected in manifest["files"].items():
        if sha256(bundle / name) != expected:
            raise ConfigError(f"{bundle / name} does not match its sha256 in manifest.json")
    return manifest
