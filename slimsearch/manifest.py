"""A bundle's ``manifest.json``: the sha256 of every file ``slimsearch export`` wrote.

One checker for everyone who trusts a bundle (``load_model``, ``slimsearch verify``, the fresh
process that re-measures it): every listed file must be a plain file directly in the bundle
folder and match its hash. A name such as ``../x`` or a symbolic link is refused, so checking a
bundle never reads a file outside it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from slimsearch.errors import ArtifactError

MANIFEST_FILE = "manifest.json"
#: The model file of a trial folder and of a bundle (``compression.artifact`` writes it).
MODEL_FILE = "model.safetensors"
#: What ``slimsearch export`` records beside the files, and re-measuring a bundle reads.
EXPORT_KEYS = ("trial", "runtime", "artifact")


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_bundle(folder: Path) -> bool:
    return (folder / MANIFEST_FILE).is_file()


def check_bundle(bundle: str | Path, *, exported: bool = False) -> dict[str, Any]:
    """Return the bundle's manifest once every file it lists is checked; ``ArtifactError``
    naming the file when one is missing, outside the bundle, or modified, or when the
    manifest does not list the model file (with ``exported``: or lacks what export records,
    the trial, the runtime and its file)."""
    bundle = Path(bundle)
    manifest_path = bundle / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = {str(name): str(digest) for name, digest in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{manifest_path} is not a valid bundle manifest ({exc!r}); export "
                            "the trial again") from exc
    if MODEL_FILE not in files:
        raise ArtifactError(f"{manifest_path} does not list {MODEL_FILE}, so the model file is not "
                            "checked; the bundle was modified: export the trial again")
    missing = [key for key in EXPORT_KEYS if exported and key not in manifest]
    if missing or (exported and manifest["artifact"] not in files):
        raise ArtifactError(f"{manifest_path} lacks {', '.join(missing) or 'its artifact file'}; "
                            "it was not written by slimsearch export: export the trial again")
    for name, expected in files.items():
        listed = bundle / name
        if name in ("", ".", "..") or Path(name).name != name or listed.is_symlink():
            raise ArtifactError(f"{manifest_path} lists {name!r}, which is not a file directly in "
                                "the bundle folder; the bundle was modified: export the trial again")
        if not listed.is_file():
            raise ArtifactError(f"{listed} is missing: {MANIFEST_FILE} lists it; the bundle is "
                                "incomplete: export the trial again")
        if sha256(listed) != expected:
            raise ArtifactError(f"{listed} does not match the sha256 in {MANIFEST_FILE}: the "
                                "bundle was modified or corrupted; export the trial again")
    return manifest
