"""The run folder: one per search, holding everything the report and export read.

    runs/<name>/
      .slimsearch-run   the marker: slimsearch made this folder (.slimsearch-run.lock: its setup lock)
      experiment.toml   the experiment as given       run.json       settings, versions
      study.journal     the Optuna study (default)    teacher/       model file, logits, metrics
      trials/00012/     recipe, metrics, model file   pareto.json, report.html

slimsearch writes only into a run folder it made: a folder that does not exist yet, an empty
one, or one holding its marker. Anything else is refused before a byte is written, since
"the run folder" is a place slimsearch deletes and overwrites files in.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimsearch.atomic import read_json, write_json, write_text
from slimsearch.errors import ConfigError
from slimsearch.locks import file_lock
from slimsearch.run.storage import public_url, shown, without_password

#: Settings that may differ when a run continues (budgets), everything else must match.
#: (Which backend runs the trials does not change them: a study may mix local and Ray trials.)
#: (The storage is compared as the URL the run opens, not as the experiment spells it.)
MAY_CHANGE = {("search", "trials"), ("search", "timeout"), ("search", "backend"),
              ("search", "ray_address"), ("search", "cpus_per_trial"), ("search", "storage"),
              ("search", "refine")}
#: The layout of run folders this code reads and writes; another one is refused.
RUN_FORMAT = 1
#: The file that marks a folder as slimsearch's own.
MARKER = ".slimsearch-run"
#: The lock held while a run is set up (run.json, the study, the teacher), so two runs
#: started at once cannot both do it; it counts as the marker's (it comes first).
SETUP_LOCK = ".slimsearch-run.lock"


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one run folder."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def sensitivity(self) -> Path:
        """The sensitivity pre-pass (``search.sensitivity``), kept for resumes and the report."""
        return self.root / "sensitivity.json"

    @property
    def pareto_json(self) -> Path:
        return self.root / "pareto.json"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def confirmed(self) -> Path:
        """The confirmation pass's re-measurements of the Pareto trials (``slimsearch.confirm``)."""
        return self.root / "confirmed.json"

    def trial(self, number: int) -> Path:
        return self.root / "trials" / f"{number:05d}"

    def exists(self) -> bool:
        return self.run_json.is_file()

    def is_ours(self) -> bool:
        """True when slimsearch made this folder: it holds the marker (or, for runs made
        before the marker existed, a run.json that slimsearch wrote)."""
        if (self.root / MARKER).is_file():
            return True
        try:
            return "run_format" in read_json(self.run_json)
        except (OSError, ValueError, TypeError):
            return False

    def check_writable(self) -> None:
        """``ConfigError`` unless a run may be created or continued here: the path is a folder
        slimsearch made, an empty folder, or a new folder in a writable one. Writes nothing."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--run-dir {root}: is a file, not a folder; give the path of a "
                              "new folder (slimsearch creates it)")
        if root.is_dir():
            held = sorted(p.name for p in root.iterdir() if p.name not in (SETUP_LOCK, MARKER))
            if held and not self.is_ours():
                raise ConfigError(
                    f"--run-dir {root}: this folder holds files slimsearch did not make "
                    f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}) and slimsearch "
                    "writes only into an empty folder or a run folder it created; give a new "
                    f"folder, e.g. --run-dir {root / 'run'}")
            writable = root
        else:
            writable = next(p for p in root.absolute().parents if p.exists())
            if not writable.is_dir():
                raise ConfigError(f"--run-dir {root}: {writable} is a file, so no folder can be "
                                  "made under it; give another path")
        if not os.access(writable, os.W_OK | os.X_OK):
            raise ConfigError(f"--run-dir {root}: {writable} is not writable by this user; give a "
                              "folder you may write in")

    @contextlib.contextmanager
    def setting_up(self, *, say: Callable[[str], None] | None = None) -> Iterator[None]:
        """Create the folder and its marker if needed and hold the run's setup lock while the
        block runs: checking or writing run.json, creating the study and training the teacher
        happen in one process at a time. ``ConfigError`` when the folder is not ours or
        cannot be made."""
        def waiting() -> None:
            if say is not None:
                say(f"waiting for another slimsearch process setting up {self.root} (creating "
                    "the run, or training the teacher); this one goes on when it is done")

        self.check_writable()
        with contextlib.ExitStack() as stack:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                stack.enter_context(file_lock(self.root / SETUP_LOCK, on_wait=waiting))
            except OSError as exc:
                raise ConfigError(f"--run-dir {self.root}: cannot create the run folder: "
                                  f"{exc.strerror}; give a folder you may write in") from exc
            if not (self.root / MARKER).is_file():  # in place: a temp file beside it would
                # look like a stranger's file to another process checking the folder now
                (self.root / MARKER).write_text("This folder is a slimsearch run folder; "
                                                "slimsearch may rewrite any file in it.\n")
            yield

    def config(self) -> Any:
        """The run's experiment (``experiment.toml`` here), its plug-in task modules looked
        up beside the original file, where they were when the run started."""
        import dataclasses

        from slimsearch.experiment import load_experiment

        settings = self.settings()  # refuses a folder that is not a run
        config = load_experiment(self.root / "experiment.toml")
        if settings.get("experiment_file"):
            config = dataclasses.replace(config, base_dir=Path(settings["experiment_file"]).parent)
        return config

    def settings(self) -> dict[str, Any]:
        """The contents of ``run.json``; a ``ConfigError`` when this is not a run folder."""
        if not self.exists():
            raise ConfigError(f"{self.root} is not a slimsearch run folder (no run.json). Start "
                              "one with: slimsearch run EXPERIMENT.toml")
        try:
            settings = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
            raise ConfigError(f"{self.run_json} cannot be read ({type(exc).__name__}: {exc}): the "
                              "run's settings are damaged. Restore it from a backup, or start a new "
                              "run with another --run-dir") from exc
        if not isinstance(settings, dict) or not isinstance(settings.get("experiment"), dict):
            raise ConfigError(f"{self.run_json} is not the settings file slimsearch writes (no "
                              "'experiment' table); restore it, or start a new run with another "
                              "--run-dir")
        return settings

    def check_same_experiment(self, experiment: dict[str, Any], storage: str | None, *,
                              fingerprint: str, device: str,
                              objectives: dict[str, str] | None = None) -> None:
        """Refuse to continue a run whose experiment, search space or measuring device changed,
        naming what changed: their trials would not be comparable."""
        old = self.settings()
        if old.get("run_format", 0) != RUN_FORMAT:  # none recorded: before format 1
            raise ConfigError(f"{self.root} was written by a slimsearch with run format "
                              f"{old.get('run_format', 0)} (this one reads {RUN_FORMAT}); continue it with "
                              f"slimsearch {old.get('environment', {}).get('slimsearch', '?')}, or "
                              "start a new run")
        if objectives is not None and old.get("objectives", objectives) != objectives:
            raise ConfigError(f"{self.root} optimised {old['objectives']}, this slimsearch "
                              f"optimises {objectives}; start a new run")
        changed = [f"{section}.{key}" if key else section
                   for section, key in _diff(old["experiment"], experiment)
                   if (section, key) not in MAY_CHANGE]
        before = old.get("storage")
        if before is not None:  # as this slimsearch records it (older runs: as typed)
            before = public_url(before)[0]
        if before != storage:
            changed.append(f"storage ({shown(before) if before else None!r} -> "
                           f"{shown(storage) if storage else None!r})")
        if old.get("space_fingerprint") != fingerprint and not changed:
            changed.append("the task's search space (its layers or default student choices)")
        if old.get("device") != device:
            changed.append(f"the measuring device ({old.get('device')} -> {device})")
        if changed:
            raise ConfigError(f"{self.root} holds a run of a different experiment (changed: "
                              f"{', '.join(changed)}). Start a new run with --run-dir "
                              f"{self.root}-2, or restore the experiment to continue this one")

    def create(self, experiment_text: str, settings: dict[str, Any]) -> None:
        """Write the experiment copy and ``run.json`` (each atomically) for a new run; call it
        inside ``setting_up``. run.json comes last: a run exists once it is there."""
        write_text(self.root / "experiment.toml", experiment_text)
        write_json(self.run_json, settings)


def experiment_copy(experiment_file: Path) -> str:
    """The text of ``experiment_file`` for the run folder's copy: as written, except that a
    ``search.storage`` URL loses its password (the run never stores one). ``ConfigError``
    when the password cannot be taken out (the URL is written with TOML escapes)."""
    import tomllib

    text = experiment_file.read_text(encoding="utf-8")
    url = tomllib.loads(text).get("search", {}).get("storage")
    public, password = without_password(url) if isinstance(url, str) else (url, None)
    if password is None:
        return text
    copy = text.replace(url, public)
    if tomllib.loads(copy).get("search", {}).get("storage") != public:
        raise ConfigError(f"{experiment_file}: search.storage holds a password slimsearch cannot "
                          "take out of its copy of the experiment (the URL is written with "
                          "escapes); write the URL without the password and set it in "
                          "SLIMSEARCH_STORAGE_PASSWORD (or PGPASSFILE) instead")
    return copy


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str]]:
    changes = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [(section, k) for k in sorted(set(a) | set(b))
                        if _norm(a.get(k)) != _norm(b.get(k))]
        elif _norm(a) != _norm(b):
            changes.append((section, ""))
    return changes


def _norm(value: Any) -> Any:
    """Tuples and lists compare equal (run.json stores lists)."""
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value
