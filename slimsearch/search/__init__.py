"""Search: the engine-free trial objective and the backends that drive it."""

from slimsearch.search.objective import OBJECTIVES, TrialRunner
from slimsearch.search.optuna_backend import Prepared, RunResult, prepare, run_search
from slimsearch.search.run_folder import RunFolder
from slimsearch.search.storage import open_storage

__all__ = ["OBJECTIVES", "Prepared", "RunFolder", "RunResult", "TrialRunner", "open_storage",
           "prepare", "run_search"]
