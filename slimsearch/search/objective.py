"""The trial objective, free of any search engine: recipe in, measured metrics out.

    recipe -> compression.build -> model file -> runtime.materialize -> evaluators -> metrics

Accuracy, size and latency are all measured on the executable form the target's runtime makes
from the model file (for the ``torch`` runtime, the model rebuilt from that file itself), the
same files ``slimsearch export`` hands out. The trial folder ends up holding everything needed
to rebuild and re-measure that model: recipe, seed, metrics, versions and the files.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimsearch._version import __version__
from slimsearch.atomic import read_json, write_json, write_text
from slimsearch.compression import (
    MODEL_FILE,
    CompressedModel,
    build,
    load_float_model,
    save_artifact,
)
from slimsearch.compression.pruning import structured_blockers
from slimsearch.devices import computing, free_memory, resolve_device, step_aside
from slimsearch.errors import TrialStopped
from slimsearch.evaluators import (
    EvalContext,
    LatencyCache,
    Reference,
    evaluate,
    metric_suffix,
    reference_from_metrics,
)
from slimsearch.experiment import ConstraintsConfig, ExperimentConfig, SpaceConfig
from slimsearch.run import RunFolder
from slimsearch.runtimes import Runtime, get_runtime
from slimsearch.search.progress import TrialProgress
from slimsearch.search.teacher import Teacher, prepare_teacher
from slimsearch.spaces import Recipe, compressible_layers
from slimsearch.tasks import Task, make_task
from slimsearch.timing.latency import pin_allocator
from slimsearch.training import score


def environment() -> dict[str, str]:
    """Versions that a rebuilt trial must match to reproduce its numbers, and the memory
    allocator's settings its latency was measured with (``timing.latency.pin_allocator``)."""
    import numpy
    return {"slimsearch": __version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or "unknown",
            "allocator": pin_allocator()}


def relative_to_teacher(metrics: dict[str, Any], teacher: dict[str, Any],
                        batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    """Speedup (teacher latency / latency, per batch size) and size ratio against the teacher
    measured in the same run on the same target, and the "slower than teacher" flag."""
    relative: dict[str, Any] = {"size_ratio": round(teacher["size_bytes"] / metrics["size_bytes"], 4)}
    for position, batch in enumerate(batch_sizes):
        suffix = metric_suffix(position, batch)
        ours, theirs = metrics.get(f"latency{suffix}_ms"), teacher.get(f"latency{suffix}_ms")
        if ours and theirs:
            relative[f"speedup{suffix}"] = round(theirs / ours, 4)
    relative["slower_than_teacher"] = relative.get("speedup", 1.0) < 1.0
    return relative


def constraint_values(metrics: dict[str, Any], teacher: dict[str, Any],
                      constraints: ConstraintsConfig) -> dict[str, float]:
    """How far past each configured constraint a trial is (<= 0: met), in the metric's unit:
    accuracy drop (fraction), bytes, milliseconds."""
    values = {}
    if constraints.max_accuracy_drop is not None:
        # rounded so that float noise (0.98 - 0.97 = 0.010000000000000009) meets a 0.01 limit
        drop = teacher["val_accuracy"] - metrics["val_accuracy"]
        values["accuracy_drop"] = round(drop - constraints.max_accuracy_drop, 9)
    if constraints.max_size_bytes is not None:
        values["size_bytes"] = float(metrics["size_bytes"] - constraints.max_size_bytes)
    if constraints.max_latency_ms is not None:
        values["latency_ms"] = metrics["latency_ms"] - constraints.max_latency_ms
    return values


def early_stop_epoch(epochs: int, after: int) -> int:
    """After how many epochs of a stage of ``epochs`` a trial is checked for early stopping:
    ``after`` (``constraints.early_stop_after_epochs``), or half the stage where that is
    later, and before its last epoch. A long stage climbs far in its first half: a
    digits-cnn student sliced to half width and distilled for 15 epochs read 0.77 validation
    accuracy after 2 epochs, 0.85 after 7 and 0.89 at the end (benchmarks/RESULTS.md)."""
    return max(1, min(max(after, epochs // 2), epochs - 1))


@dataclass
class TrialRunner:
    """Builds and measures recipes for one run; the same object serves every trial.

    Work that loads the device (training, evaluation) runs under ``devices.computing`` so that
    no latency measurement of another local trial overlaps it; timing takes the device alone.
    """

    config: ExperimentConfig
    task: Task
    teacher: Teacher
    device: torch.device
    latency_cache: LatencyCache | None = None
    #: The teacher's metrics on this target, once measured: trials are reported relative to it.
    teacher_metrics: dict[str, Any] | None = None
    #: The teacher's model file: on the CPU, every trial's latency is timed against it
    #: (``timing.paired``), and multiplied by its latency in ``teacher_metrics``.
    teacher_file: Path | None = None
    #: Layers structured pruning cannot shrink, and why (``structured_blocked``): the space
    #: never asks for it there; every trial's record says so.
    structured_blocked: dict[str, str] = field(default_factory=dict)
    _reference: Reference | None = field(default=None, init=False, repr=False)
    #: Where the trial being built is (``search.progress``).
    _progress: TrialProgress | None = field(default=None, init=False, repr=False)
    _reference_dir: tempfile.TemporaryDirectory | None = field(default=None, init=False,
                                                               repr=False)

    @property
    def runtime(self) -> Runtime:
        return get_runtime(self.config.target.runtime)

    def reference(self) -> Reference | None:
        """The teacher in the target's runtime and its latencies at the start of the run,
        which CPU latencies are timed against; built once per process. None on CUDA, and
        before the teacher is measured."""
        if (self._reference is None and self.device.type == "cpu"
                and self.teacher_file is not None and self.teacher_metrics is not None):
            target = self.config.target
            scratch = tempfile.TemporaryDirectory(prefix="slimsearch-reference-")
            try:
                executable = self.runtime.materialize(
                    self.teacher_file, target=target, device=self.device,
                    out_dir=Path(scratch.name), example=self.task.example_inputs(target.batch_size))
            except BaseException:
                scratch.cleanup()
                raise
            self._reference_dir = scratch  # removed with the runner (its files are in use)
            self._reference = reference_from_metrics(executable, self.teacher_metrics,
                                                     target.batch_sizes)
        return self._reference

    def measure(self, model_file: Path, *, model: torch.nn.Module | None = None,
                seconds: dict[str, float] | None = None,
                is_reference: bool = False) -> dict[str, Any]:
        """Materialize ``model_file`` in the target's runtime (its artifact is written beside
        it) and measure that executable form: accuracy, the artifact's bytes, latency.
        ``model``: the float model the file was written from, if at hand (its parameters are
        counted; else the file is loaded once more for that). ``seconds`` (if given)
        receives how long materializing and each evaluator took. ``is_reference``: this is
        the teacher, timed alone at rest; every other model is timed against it."""
        target = self.config.target
        seconds = {} if seconds is None else seconds
        with computing(self.device):
            start = time.perf_counter()
            executable = self.runtime.materialize(
                model_file, target=target, device=self.device, out_dir=model_file.parent,
                example=self.task.example_inputs(target.batch_size))
            seconds["materialize"] = round(time.perf_counter() - start, 4)
            context = EvalContext(task=self.task, executable=executable,
                                  model=model or load_float_model(model_file),
                                  target=target, device=self.device,
                                  latency_cache=self.latency_cache,
                                  reference=None if is_reference else self.reference(),
                                  is_reference=is_reference,
                                  # the teacher is the anchor at every batch size; a trial
                                  # is timed at the objective's, the rest for the front
                                  batch_sizes=None if is_reference else target.batch_sizes[:1])
            metrics = evaluate(context, seconds=seconds)
        metrics.update(runtime=executable.runtime, artifact_file=executable.artifact.name,
                       dtype=target.dtype)
        if self.teacher_metrics is not None:
            metrics.update(relative_to_teacher(metrics, self.teacher_metrics, target.batch_sizes))
        del context, executable
        if self.device.type == "cuda":  # the next trial starts from an empty cache
            free_memory(self.device)
        return metrics

    def between_epochs(self, model: torch.nn.Module, stage: str, epoch: int, epochs: int) -> None:
        """Let a waiting latency measurement of another local trial have the device, then
        stop this trial if it is hopeless (``early_stop``); say where the trial is."""
        if self._progress is not None:
            self._progress.at(stage, epoch, epochs)
        step_aside(self.device)
        self.early_stop(model, stage, epoch, epochs)

    def early_stop(self, model: torch.nn.Module, stage: str, epoch: int, epochs: int) -> None:
        """Stop a hopeless trial: at ``early_stop_epoch`` of a training stage, validation
        accuracy more than ``early_stop_margin`` below what ``max_accuracy_drop`` allows
        cannot be trained back in the epochs left (Optuna's pruners do not support
        multi-objective studies, so this is our own rule)."""
        rules = self.config.constraints
        if (rules.max_accuracy_drop is None or rules.early_stop_margin is None
                or self.teacher_metrics is None
                or epoch != early_stop_epoch(epochs, rules.early_stop_after_epochs)):
            return
        floor = (self.teacher_metrics["val_accuracy"] - rules.max_accuracy_drop
                 - rules.early_stop_margin)
        was_training = model.training
        value = score(model, self.task.data("val"), self.task.metric, device=self.device)
        model.train(was_training)
        if value < floor:
            raise TrialStopped(f"stopped early: validation accuracy {value:.4f} after {epoch} "
                               f"epochs of {stage} is below {floor:.4f} (the teacher's "
                               f"{self.teacher_metrics['val_accuracy']:.4f} - max_accuracy_drop "
                               f"{rules.max_accuracy_drop} - early_stop_margin "
                               f"{rules.early_stop_margin})")

    def plan_execution(self, compressed: CompressedModel, recipe: Recipe) -> dict[str, Any] | None:
        """Which layers run on which kernels, as the target's runtime decides by timing them
        at the target batch (None: the float layers as they are)."""
        target = self.config.target
        return self.runtime.plan(compressed.model, recipe, target=target, device=self.device,
                                 batch=self.task.example_inputs(target.batch_size),
                                 calibration=lambda: self.task.calibration_inputs)

    def __call__(self, recipe: Recipe, trial_dir: Path, *, seed: int,
                 deadline: float | None = None) -> dict[str, Any]:
        """Build ``recipe``, write its model file into ``trial_dir`` and return its metrics.
        ``deadline`` (``time.monotonic()``): training that would go past it stops the trial
        (``TrialStopped``)."""
        trial_dir.mkdir(parents=True, exist_ok=True)
        write_text(trial_dir / "recipe.json", recipe.to_json() + "\n")
        write_json(trial_dir / "environment.json", {"seed": seed, **environment()})
        start = time.perf_counter()
        progress = self._progress = TrialProgress(trial_dir)
        progress.at("building the student")
        with computing(self.device):
            compressed = build(self.task, self.teacher.model, self.teacher.targets, recipe,
                               train=self.config.train, seed=seed, device=self.device,
                               round_to=self.config.space.channel_multiple,
                               deadline=deadline, check=self.between_epochs)
            trained = time.perf_counter()
            progress.at("choosing kernels")
            # the plan's timings take the device alone (an exclusive lock inside this one)
            compressed.execution = self.plan_execution(compressed, recipe)
            compressed.record["execution"] = compressed.execution or "float (no int8 candidate)"
            built = time.perf_counter()
            model_file = save_artifact(compressed, trial_dir / MODEL_FILE)
        # Where a trial's time goes (seconds): "plan" and "latency_ms" are latency
        # measurement; "build" is training and compressing; the rest is bookkeeping.
        seconds = {"build": round(trained - start, 4), "plan": round(built - trained, 4),
                   "save": round(time.perf_counter() - built, 4)}
        progress.at("measuring accuracy, size and latency")
        metrics = self.measure(model_file, model=compressed.model, seconds=seconds)
        self._progress = None
        metrics["seconds"] = seconds
        kernels = list((compressed.execution or {}).get("layers", {}).values())
        metrics["int8_layers"] = sum(how in ("int8", "int8-weight-only") for how in kernels)
        metrics["low_precision_layers"] = sum(how != "float" for how in kernels)
        untouched = compressed.record.get("left_float", {})
        metrics["left_float_weights"] = sum(untouched.values())  # see build.json: left_float
        if self.structured_blocked:  # see build.json: structured_blocked
            compressed.record["structured_blocked"] = self.structured_blocked
            metrics["structured_blocked_layers"] = len(self.structured_blocked)
        write_json(trial_dir / "build.json", compressed.record)
        write_json(trial_dir / "metrics.json", metrics)
        return metrics


def structured_blocked(task: Task, space: SpaceConfig) -> dict[str, str]:
    """The layers of the teacher-shaped student that structured pruning cannot shrink, and
    why (``compression.pruning.structured_blockers``); none when the space has no structured
    pruning. Deterministic, so every process of a run finds the same."""
    if "structured" not in space.pruning:
        return {}
    model = task.build_model(**task.teacher_kwargs).eval()
    example = task.example_inputs(1)
    candidates = [i.name for i in compressible_layers(model, example) if i.structured_ok]
    return structured_blockers(model, example, candidates)


def runner_for_run(run_dir: str) -> TrialRunner:
    """The run's ``TrialRunner`` in another process (a Ray worker), from the run folder: its
    experiment, the cached teacher and its measured metrics."""
    folder = RunFolder(Path(run_dir))
    if not (folder.teacher / "metrics.json").exists():
        raise RuntimeError(f"the run folder {run_dir} is not visible on {platform.node()}: put "
                           "it on a filesystem every node mounts at the same path")
    config = folder.config()
    task = make_task(config.task, seed=config.seed, base_dir=config.base_dir,
                     metrics=config.metrics,
                     options=config.task_options)
    device = resolve_device(config.target.device)
    teacher = prepare_teacher(task, config.train, seed=config.seed, cache_dir=folder.teacher,
                              device=device)  # cached by the driver: loads, never trains
    return TrialRunner(config=config, task=task, teacher=teacher, device=device,
                       latency_cache=LatencyCache(folder.root / "latency_cache.json"),
                       teacher_metrics=read_json(folder.teacher / "metrics.json"),
                       teacher_file=folder.teacher / MODEL_FILE,
                       structured_blocked=structured_blocked(task, config.space))
