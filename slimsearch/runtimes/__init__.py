"""Runtimes: how a compressed model executes where it is deployed (today: int8 on CPU)."""

from slimsearch.runtimes.int8 import ExecutionPlan, build_executable, engine, plan_execution

__all__ = ["ExecutionPlan", "build_executable", "engine", "plan_execution"]
