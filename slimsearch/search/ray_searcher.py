"""``StudySearcher``: Ray Tune's search algorithm for slimsearch, on the driver.

It imports Ray Tune, so only ``ray_backend.run_trials`` imports it, once Ray is known to be
installed. Each trial Tune asks for is started by the run's trial lifecycle (the same claim on
the budget as local workers make) and finished by it with the outcome the Ray worker reported;
Tune only schedules.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ray.tune.search import Searcher

from slimsearch.search.lifecycle import Outcome, Started, TrialLifecycle

#: The key of a Ray trial's one result: its outcome as JSON (Tune flattens nested results).
OUTCOME = "slimsearch_outcome"
#: Times Ray restarts a trial whose worker process died (a lost node, a killed process).
MAX_RETRIES = 1


class StudySearcher(Searcher):
    """Trials asked of and told to the run's Optuna study (see ``ray_backend``)."""

    def __init__(self, lifecycle: TrialLifecycle, *, deadline_unix: float | None,
                 threads: int) -> None:
        super().__init__()
        self.lifecycle, self.deadline_unix, self.threads = lifecycle, deadline_unix, threads
        #: Tune trial id -> the trial as started on the study
        self.pending: dict[str, Started] = {}
        self.budget_claimed = False  # until a trial ends: no need to read the study again

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its search algorithm into the experiment folder (for a Tuner.restore
        # that slimsearch does not use: the study is the state). The study, the space with
        # its task's data and the printer (all in the lifecycle) stay out of that file.
        return {k: v for k, v in self.__dict__.items() if k not in ("lifecycle", "pending")}

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return True  # the objectives and the space are the study's, not Tune's

    def _out_of_time(self) -> bool:
        return self.deadline_unix is not None and time.time() >= self.deadline_unix

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._out_of_time() or self.lifecycle.stopped:
            return None if self.pending else Searcher.FINISHED
        if self.budget_claimed and self.pending:  # Tune asks ~10 times a second
            return None
        started = self.lifecycle.start()
        if started is None:  # a running trial may yet be re-enqueued: ask again later
            self.budget_claimed = True
            return None if self.pending else Searcher.FINISHED
        if started.answered is not None:  # drawing it failed, or a finished trial's recipe:
            self.lifecycle.finish(started, started.answered)  # told at once, the next is asked
            return None
        self.pending[trial_id] = started
        return {"run_dir": str(self.lifecycle.folder.root), "number": started.number,
                "recipe": started.recipe.to_dict(), "seed": started.seed,
                "threads": self.threads, "deadline_unix": self.deadline_unix}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self.pending:
            return
        started = self.pending.pop(trial_id)
        self.budget_claimed = False  # it may be re-enqueued, or not counted
        if result and OUTCOME in result:
            outcome = Outcome.from_dict(json.loads(result[OUTCOME]))
        elif error:
            # Its worker process died, again after Ray's retry: most likely this recipe
            # (out of memory, a crash in native code). Counted, like any failure.
            outcome = Outcome("FAIL", error=f"its Ray worker died {MAX_RETRIES + 1} times (out "
                              "of memory? a crash in native code? see Ray's logs)")
        else:  # stopped by Tune before it reported: not its result
            outcome = Outcome("PRUNED", stopped="Ray Tune stopped it before it finished",
                              by_deadline=True)
        self.lifecycle.finish(started, outcome)

    def abandon_pending(self) -> None:
        """Trials Tune never reported back (it stops the running ones at its time budget
        without telling the searcher; or the run was interrupted): PRUNED by the time budget,
        else FAIL; not counted either way, and their parameters run again."""
        out_of_time = self._out_of_time()
        for started in self.pending.values():
            self.lifecycle.finish(started, Outcome(
                "PRUNED", stopped="the run's time budget ended while it ran", by_deadline=True)
                if out_of_time else Outcome("FAIL", error="the Ray run ended while the trial ran",
                                            interrupted=True))
        self.pending.clear()

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the study is the state (Tune calls this after each trial)."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: a resumed run starts a new Tuner on the same study."""
