"""The run folder: one per search, holding everything the report and export read.

    runs/<name>/
      experiment.toml   the experiment as given       run.json       settings, versions
      study.journal     the Optuna study (default)    teacher/       model file, logits, metrics
      trials/00012/     recipe, metrics, model file   pareto.json, report.html
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimsearch.atomic import read_json, write_json
from slimsearch.errors import ConfigError

#: Settings that may differ when a run continues (budgets), everything else must match.
#: (Which backend runs the trials does not change them: a study may mix local and Ray trials.)
MAY_CHANGE = {("search", "trials"), ("search", "timeout"), ("search", "backend"),
              ("search", "ray_address"), ("search", "cpus_per_trial")}
#: The layout of run folders this code reads and writes; another one is refused.
RUN_FORMAT = 1


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
    def pareto_json(self) -> Path:
        return self.root / "pareto.json"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    def trial(self, number: int) -> Path:
        return self.root / "trials" / f"{number:05d}"

    def exists(self) -> bool:
        return self.run_json.is_file()

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
        return read_json(self.run_json)

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
        if old.get("storage") != storage:
            changed.append(f"storage ({old.get('storage')!r} -> {storage!r})")
        if old.get("space_fingerprint") != fingerprint and not changed:
            changed.append("the task's search space (its layers or default student choices)")
        if old.get("device") != device:
            changed.append(f"the measuring device ({old.get('device')} -> {device})")
        if changed:
            raise ConfigError(f"{self.root} holds a run of a different experiment (changed: "
                              f"{', '.join(changed)}). Start a new run with --run-dir "
                              f"{self.root}-2, or restore the experiment to continue this one")

    def create(self, experiment_file: Path, settings: dict[str, Any]) -> None:
        """Write the experiment copy and ``run.json`` (atomically) for a new run."""
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(experiment_file, self.root / "experiment.toml")
        write_json(self.run_json, settings)


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
