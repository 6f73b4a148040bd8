"""Tasks: a model factory (whose keyword arguments are the student knobs), data and a teacher."""

from slimsearch.tasks._base import (
    Task,
    Vocabulary,
    factory_path,
    kept_layers,
    model_factory,
    resolve_factory,
)
from slimsearch.tasks._registry import list_tasks, make_task, register_task
from slimsearch.tasks.data import Data, Split

__all__ = [
    "Data",
    "Split",
    "Task",
    "Vocabulary",
    "factory_path",
    "kept_layers",
    "list_tasks",
    "make_task",
    "model_factory",
    "register_task",
    "resolve_factory",
]
