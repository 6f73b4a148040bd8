"""The sampler choice: ``auto`` by space and progress, names as given, rebuilt the same way."""

from __future__ import annotations

import optuna
import pytest

from slimsearch.experiment import ExperimentConfig, SearchConfig
from slimsearch.search.samplers import NSGA2_AFTER, choose, make_sampler


def config(sampler: str) -> ExperimentConfig:
    return ExperimentConfig(name="x", task="digits-mlp", seed=3,
                            search=SearchConfig(trials=30, sampler=sampler))


def test_auto_picks_by_space_and_progress() -> None:
    assert choose("auto", finished=0, numeric_only=False) == "tpe"
    assert choose("auto", finished=0, numeric_only=True) == "gp"
    assert choose("auto", finished=NSGA2_AFTER, numeric_only=False) == "nsga2"
    assert choose("random", finished=NSGA2_AFTER, numeric_only=True) == "random"


@pytest.mark.parametrize(("name", "kind"), [
    ("tpe", optuna.samplers.TPESampler), ("gp", optuna.samplers.GPSampler),
    ("nsga2", optuna.samplers.NSGAIISampler), ("random", optuna.samplers.RandomSampler),
    ("auto", optuna.samplers.TPESampler)])
def test_each_name_builds_its_sampler_with_recorded_settings(name: str, kind: type) -> None:
    sampler, settings = make_sampler(config(name), finished=12, n_params=15)
    assert isinstance(sampler, kind)
    assert settings["configured"] == name and settings["seed"] == 3 + 12
    assert settings["from_trial"] == 12
    if name == "nsga2":  # sized to the space, not the default 50 that makes short runs random
        assert settings["population_size"] == 30


def test_the_same_progress_rebuilds_the_same_sampler_settings() -> None:
    a = make_sampler(config("auto"), finished=7, n_params=10)[1]
    b = make_sampler(config("auto"), finished=7, n_params=10)[1]
    assert a == b


def test_workers_of_one_run_are_seeded_apart() -> None:
    seeds = {make_sampler(config("auto"), finished=0, n_params=10, worker=w)[1]["seed"]
             for w in range(4)}
    assert len(seeds) == 4  # same-seeded samplers on one study would propose the same trials
