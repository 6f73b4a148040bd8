"""Built-in tasks by name, and plug-in tasks by ``"module:function"``."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from slimsearch.errors import ConfigError, did_you_mean
from slimsearch.tasks._base import Task
from slimsearch.tasks.diabetes import make_diabetes_mlp_task
from slimsearch.tasks.digits import make_digits_cnn_task, make_digits_mlp_task
from slimsearch.tasks.digits_resnet import make_digits_resnet_task
from slimsearch.tasks.digits_transformer import make_digits_transformer_task
from slimsearch.tasks.metrics import resolve_metrics
from slimsearch.tasks.minilm_bbc import make_minilm_bbc_task

TaskMaker = Callable[[int], Task]

_TASKS: dict[str, TaskMaker] = {}


def register_task(name: str, maker: TaskMaker) -> None:
    """Make ``maker(seed) -> Task`` available as ``task = "<name>"`` in experiments."""
    if name in _TASKS:
        raise ValueError(f"task {name!r} is already registered")
    _TASKS[name] = maker


def list_tasks() -> dict[str, str]:
    """Registered task names and a one-line description of each."""
    return {name: (inspect.getdoc(maker) or "").splitlines()[0] for name, maker in _TASKS.items()}


def make_task(spec: str, *, seed: int, base_dir: Path | None = None,
              metrics: Sequence[str] | None = None,
              options: Mapping[str, Any] | None = None) -> Task:
    """Build the task an experiment names: a registered name or ``"module:function"``, scored
    by ``metrics`` (the experiment's ``metrics``) where given, else by its own.

    A plug-in function is called as ``function(seed=seed, **options)`` and must return a
    ``Task``; its module is imported from ``base_dir`` (the experiment file's folder) or the
    Python path. ``options`` (the experiment's ``[task_options]``) must be keyword arguments
    the maker takes, checked before it is called.
    """
    task = _make_task(spec, seed=seed, base_dir=base_dir, options=dict(options or {}))
    if metrics is None:
        return task
    resolve_metrics(metrics, where=f"metrics = {list(metrics)}")
    return dataclasses.replace(task, metrics=tuple(metrics))


def _check_options(spec: str, maker: Callable[..., Task], options: dict[str, Any]) -> None:
    """``ConfigError`` for a ``[task_options]`` key the task's maker does not take."""
    parameters = inspect.signature(maker).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    takes = [n for n, p in parameters.items() if n != "seed" and p.kind in (
        inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for key in options:
        if key not in takes:
            raise ConfigError(f"task_options.{key}: task {spec!r} takes no option {key!r}."
                              f"{did_you_mean(key, takes)} Its options: "
                              f"{', '.join(takes) or 'none'}")


def _make_task(spec: str, *, seed: int, base_dir: Path | None, options: dict[str, Any]) -> Task:
    if ":" not in spec:
        if spec not in _TASKS:
            raise ConfigError(f"task = {spec!r} is not a built-in task.{did_you_mean(spec, _TASKS)} "
                              f"Built-in tasks: {', '.join(sorted(_TASKS))}; or name your own as "
                              "'my_package.my_module:make_task'")
        _check_options(spec, _TASKS[spec], options)
        return _TASKS[spec](seed, **options)
    maker = _import_plugin(spec, base_dir)
    _check_options(spec, maker, options)
    try:
        task = maker(seed=seed, **options)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"task = {spec!r}: calling it as {spec.partition(':')[2]}(seed={seed}) "
                          f"failed with {type(exc).__name__}: {exc}. A plug-in task is a function "
                          "make_task(seed: int) -> slimsearch.Task") from exc
    if not isinstance(task, Task):
        raise ConfigError(f"task = {spec!r} returned {type(task).__name__}, not slimsearch.Task")
    return task


def _import_plugin(spec: str, base_dir: Path | None) -> Callable[..., Task]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"task = {spec!r}: write a plug-in task as 'module:function', e.g. "
                          "'my_tasks:make_task'")
    if base_dir is not None and str(base_dir) not in sys.path:
        # Plug-in modules beside the experiment file import without a package install.
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"task = {spec!r}: cannot import module {module_name!r} ({exc}). Put it "
                          "beside the experiment file or install its package") from exc
    except Exception as exc:  # a SyntaxError or NameError in the user's module
        raise ConfigError(f"task = {spec!r}: importing module {module_name!r} failed with "
                          f"{type(exc).__name__}: {exc}") from exc
    maker = getattr(module, attr, None)
    if not callable(maker):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"task = {spec!r}: module {module_name!r} has no function {attr!r}."
                          f"{did_you_mean(attr, names)}")
    return maker


register_task("digits-mlp", make_digits_mlp_task)
register_task("digits-cnn", make_digits_cnn_task)
register_task("digits-resnet", make_digits_resnet_task)
register_task("diabetes-mlp", make_diabetes_mlp_task)
register_task("digits-transformer", make_digits_transformer_task)
register_task("minilm-bbc", make_minilm_bbc_task)
