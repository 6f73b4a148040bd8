"""Search: the engine-free trial objective and the backends that drive it."""

from slimsearch.search.objective import TrialRunner
from slimsearch.search.optuna_backend import Prepared, RunResult, prepare, run_search

__all__ = ["Prepared", "RunResult", "TrialRunner", "prepare", "run_search"]
