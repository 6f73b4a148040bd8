"""The trial objective, free of any search engine: recipe in, measured metrics out.

    recipe -> compression.build -> model file -> load_model -> evaluators -> metrics

Accuracy, size and latency are all measured on the model rebuilt from the file, the same file
``slimsearch export`` hands out. The trial folder ends up holding everything needed to
rebuild and re-measure that model: recipe, seed, metrics, versions and the model file.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import slimsearch
from slimsearch.atomic import write_json, write_text
from slimsearch.compression import MODEL_FILE, CompressedModel, build, load_model, save_artifact
from slimsearch.evaluators import EvalContext, evaluate
from slimsearch.experiment import ExperimentConfig
from slimsearch.runtimes import plan_execution
from slimsearch.search.teacher import Teacher
from slimsearch.spaces import Recipe
from slimsearch.tasks import Task

#: The objectives, in the order the study stores them, with their directions.
OBJECTIVES = (("val_accuracy", "maximize"), ("size_bytes", "minimize"), ("latency_ms", "minimize"))


def environment() -> dict[str, str]:
    """Versions that a rebuilt trial must match to reproduce its numbers."""
    import numpy
    return {"slimsearch": slimsearch.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or "unknown"}


@dataclass
class TrialRunner:
    """Builds and measures recipes for one run; the same object serves every trial."""

    config: ExperimentConfig
    task: Task
    teacher: Teacher
    device: torch.device

    def measure(self, model_file: Path) -> dict[str, Any]:
        """Rebuild the model from ``model_file`` and measure it on the target."""
        model = load_model(model_file)
        context = EvalContext(task=self.task, artifact=model_file, model=model,
                              target=self.config.target, device=self.device)
        return evaluate(context)

    def plan_execution(self, compressed: CompressedModel, recipe: Recipe) -> dict[str, Any] | None:
        """Which layers run on int8 kernels: measured per layer at the target batch (CPU only;
        CUDA int8 kernels are not wired in yet, so CUDA targets execute float)."""
        if self.device.type != "cpu":
            return None
        plan = plan_execution(compressed.model, {n: r.bits for n, r in recipe.layers.items()},
                              batch=self.task.example_inputs(self.config.target.batch_size),
                              calibration=self.task.train.x[:512],
                              activation_bits=recipe.activation_bits,
                              threads=self.config.target.threads,
                              symmetric=recipe.weight_scheme == "symmetric")
        return plan.to_dict() if plan else None

    def __call__(self, recipe: Recipe, trial_dir: Path, *, seed: int) -> dict[str, Any]:
        """Build ``recipe``, write its model file into ``trial_dir`` and return its metrics."""
        trial_dir.mkdir(parents=True, exist_ok=True)
        write_text(trial_dir / "recipe.json", recipe.to_json() + "\n")
        write_json(trial_dir / "environment.json", {"seed": seed, **environment()})
        start = time.perf_counter()
        compressed = build(self.task, self.teacher.model, self.teacher.train_logits, recipe,
                           train=self.config.train, seed=seed, device=self.device,
                           round_to=self.config.space.channel_multiple,
                           teacher_features=self.teacher.train_features)
        compressed.execution = self.plan_execution(compressed, recipe)
        compressed.record["execution"] = compressed.execution or "float (no int8 candidate)"
        built = time.perf_counter()
        model_file = save_artifact(compressed, trial_dir / MODEL_FILE)
        metrics = self.measure(model_file)
        plan = compressed.execution or {}
        metrics["int8_layers"] = sum(how == "int8" for how in plan.get("layers", {}).values())
        metrics["build_seconds"] = round(built - start, 3)
        metrics["measure_seconds"] = round(time.perf_counter() - built, 3)
        write_json(trial_dir / "build.json", compressed.record)
        write_json(trial_dir / "metrics.json", metrics)
        return metrics
