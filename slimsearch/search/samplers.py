"""Which Optuna sampler a run uses, rebuilt the same way every time the run continues.

``auto`` chooses by the space and by how many trials have finished:

- a space of numbers only: Gaussian-process BO (``gp``), the most sample-efficient on such
  spaces (a plug-in space could be one; slimsearch's built-in spaces are categorical);
- otherwise multivariate TPE with ``group=True`` (``tpe``): slimsearch's spaces are
  categorical and conditional (a layer's pruning method exists only when it prunes);
- after ``NSGA2_AFTER`` finished trials, NSGA-II (``nsga2``) with a population sized to the
  space: by then TPE's model is slow to fit, and a population has enough trials to evolve
  from. (NSGA-II's default population of 50 makes a short study pure random search, so it is
  never the choice early on.)

Every sampler is seeded by the experiment's seed plus the trials already finished, so a
continued run does not replay the first session's random start.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from slimsearch.experiment import ExperimentConfig

NSGA2_AFTER = 300


def choose(name: str, *, finished: int, numeric_only: bool) -> str:
    """The sampler name ``auto`` stands for here (other names stand for themselves)."""
    if name != "auto":
        return name
    if finished >= NSGA2_AFTER:
        return "nsga2"
    return "gp" if numeric_only else "tpe"


#: Worker k of a run seeds its sampler this far from worker 0's: same-seeded samplers on one
#: study propose the same parameters in turn.
WORKER_SEED_STRIDE = 100_003


def make_sampler(config: ExperimentConfig, *, finished: int, n_params: int,
                 numeric_only: bool = False,
                 worker: int = 0) -> tuple[optuna.samplers.BaseSampler, dict[str, Any]]:
    """The sampler for a session that starts with ``finished`` trials done, and its settings
    (recorded in the study so a reader can tell what produced each trial)."""
    seed = config.seed + finished + WORKER_SEED_STRIDE * worker
    chosen = choose(config.search.sampler, finished=finished, numeric_only=numeric_only)
    startup = min(10, max(2, config.search.trials // 3))
    settings: dict[str, Any] = {"sampler": chosen, "configured": config.search.sampler,
                                "seed": seed, "from_trial": finished}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if chosen == "random":
            sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
        elif chosen == "gp":
            sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
            settings["n_startup_trials"] = startup
        elif chosen == "nsga2":
            population = max(20, 2 * n_params)
            sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
            settings["population_size"] = population
        else:  # group=True: the space is conditional (pruning method only when it prunes)
            sampler = optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed,
                                                 n_startup_trials=startup)
            settings.update(multivariate=True, group=True, n_startup_trials=startup)
    return sampler, settings
