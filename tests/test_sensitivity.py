"""The sensitivity pre-pass: each layer compressed alone, measured once and kept, and the
starting recipes it suggests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from slimsearch.experiment import SpaceConfig
from slimsearch.search import sensitivity as sens
from slimsearch.search.sensitivity import measure_sensitivity, starting_recipes
from slimsearch.spaces import LayerRecipe, Recipe, SearchSpace
from slimsearch.tasks import Task
from slimsearch.training import fit

CONFIG = SpaceConfig(bits=(2, 4, 8, 32), sparsity=(0.0, 0.5, 0.75))


@pytest.fixture(scope="module")
def trained_teacher(digits_mlp_task: Task) -> torch.nn.Module:
    torch.manual_seed(0)
    model = digits_mlp_task.make_model(**digits_mlp_task.teacher_kwargs)
    fit(model, digits_mlp_task.train, epochs=8, lr=1e-3, batch_size=64, seed=0,
        device=torch.device("cpu"))
    return model.eval()


def test_each_layer_at_each_level_is_measured_once_and_kept(
        digits_mlp_task: Task, trained_teacher: torch.nn.Module, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    space = SearchSpace(digits_mlp_task, CONFIG)
    path = tmp_path / "sensitivity.json"
    before = {k: v.clone() for k, v in trained_teacher.state_dict().items()}
    result = measure_sensitivity(trained_teacher, digits_mlp_task, space, path=path,
                                 device=torch.device("cpu"), say=lambda _: None)
    assert list(result["layers"]) == ["hidden.0", "hidden.1", "head"]
    for drops in result["layers"].values():
        assert set(drops["bits"]) == {"2", "4", "8"} and set(drops["sparsity"]) == {"0.5", "0.75"}
        assert abs(drops["bits"]["8"]) <= 0.01  # 8 bits alone costs (almost) nothing
    head = result["layers"]["head"]
    assert head["bits"]["2"] > head["bits"]["8"]  # 2-bit classes hurt more than 8-bit ones
    # how far the outputs moved tells apart what accuracy cannot: 8 bits moves them a little
    assert 0 < head["divergence"]["bits 8"] < head["divergence"]["bits 2"]
    assert set(head["divergence"]) == {"bits 2", "bits 4", "bits 8", "sparsity 0.5",
                                       "sparsity 0.75"}
    assert all(torch.equal(before[k], v) for k, v in trained_teacher.state_dict().items())
    assert json.loads(path.read_text()) == result

    # a run killed after the first layer measures only the others when it resumes
    partial = dict(result, layers={"hidden.0": result["layers"]["hidden.0"]})
    path.write_text(json.dumps(partial))
    calls = []
    real_predict = sens.predict
    monkeypatch.setattr(sens, "predict", lambda *a, **k: calls.append(1) or real_predict(*a, **k))
    again = measure_sensitivity(trained_teacher, digits_mlp_task, space, path=path,
                                device=torch.device("cpu"), say=lambda _: None)
    assert again["layers"] == result["layers"]
    assert len(calls) == 1 + 2 * 5  # the teacher once, then 2 layers x 5 levels

    # another space's levels start over
    other = SearchSpace(digits_mlp_task, SpaceConfig(bits=(4, 32), sparsity=(0.0,)))
    fresh = measure_sensitivity(trained_teacher, digits_mlp_task, other, path=path,
                                device=torch.device("cpu"), say=lambda _: None)
    assert set(fresh["layers"]["head"]["bits"]) == {"4"} and not fresh["layers"]["head"]["sparsity"]


def test_starting_recipes_put_each_layer_at_what_it_tolerates_alone(digits_mlp_task: Task) -> None:
    space = SearchSpace(digits_mlp_task, CONFIG)
    sensitivity = {"layers": {
        "hidden.0": {"bits": {"2": 0.001, "4": 0.0, "8": 0.0},
                     "sparsity": {"0.5": 0.0, "0.75": 0.004}},
        "hidden.1": {"bits": {"2": 0.10, "4": 0.01, "8": 0.0},
                     "sparsity": {"0.5": 0.03, "0.75": 0.2}},
        "head": {"bits": {"2": 0.3, "4": 0.04, "8": 0.06},
                 "sparsity": {"0.5": 0.1, "0.75": 0.3}}}}
    recipes = starting_recipes(sensitivity, space)
    assert list(recipes) == ["sensitivity-0.005", "sensitivity-0.02", "sensitivity-0.05"]
    tight, middle, loose = recipes.values()
    assert {n: (r.bits, r.sparsity) for n, r in tight.layers.items()} == {
        "hidden.0": (2, 0.75), "hidden.1": (8, 0.0), "head": (32, 0.0)}  # nothing fits: 32
    assert {n: (r.bits, r.sparsity) for n, r in middle.layers.items()} == {
        "hidden.0": (2, 0.75), "hidden.1": (4, 0.0), "head": (32, 0.0)}
    assert {n: (r.bits, r.sparsity) for n, r in loose.layers.items()} == {
        "hidden.0": (2, 0.75), "hidden.1": (4, 0.5), "head": (4, 0.0)}
    for recipe in recipes.values():  # the teacher's shape, sliced, and enqueueable
        assert recipe.student == digits_mlp_task.teacher_kwargs and recipe.student_init == "slice"
        assert space.contains(recipe)
        space.params_of(recipe)


def test_grouped_layers_share_their_choices(digits_mlp_task: Task) -> None:
    import optuna

    from slimsearch.search.sensitivity import sensitivity_groups

    sensitivity = {"layers": {
        "hidden.0": {"bits": {"2": 0.001}, "sparsity": {"0.5": 0.0}},
        "hidden.1": {"bits": {"2": 0.002}, "sparsity": {"0.5": 0.001}},
        "head": {"bits": {"2": 0.3}, "sparsity": {"0.5": 0.1}}}}
    groups = sensitivity_groups(sensitivity, 2)
    assert groups == {"hidden.0": "group1", "hidden.1": "group1", "head": "group2"}
    space = SearchSpace(digits_mlp_task, CONFIG)
    space.set_groups(groups)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        recipe = space.suggest(trial)
        hidden = [recipe.layers[n] for n in recipe.layers if n.startswith("hidden")]
        assert len({(r.bits, r.sparsity) for r in hidden}) == 1  # one choice for the group
        assert not any(name.startswith("hidden.") for name in trial.params)
        assert space.contains(recipe) and space.params_of(recipe).items() <= trial.params.items()
    # a recipe whose grouped layers disagree is not in the space, and cannot be enqueued
    split = Recipe(student=dict(digits_mlp_task.teacher_kwargs), student_init="slice",
                   layers={"hidden.0": LayerRecipe(bits=2), "hidden.1": LayerRecipe(bits=8),
                           "head": LayerRecipe(bits=32)})
    assert not space.contains(split)
    assert space.contains(dataclasses.replace(split, layers={**split.layers,
                                                             "hidden.1": LayerRecipe(bits=2)}))
    with pytest.raises(ValueError, match="group must make the same choices"):
        space.params_of(split)
    # the starting recipes take the group's most sensitive member's choice
    for start in starting_recipes(sensitivity, space).values():
        assert start.layers["hidden.0"] == start.layers["hidden.1"] and space.contains(start)


def test_a_costly_pre_pass_scores_the_samples_that_fit_its_budget(
        digits_mlp_task: Task, trained_teacher: torch.nn.Module, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setattr(sens, "BUDGET_SECONDS", 1e-4)
    result = measure_sensitivity(trained_teacher, digits_mlp_task, SearchSpace(digits_mlp_task, CONFIG),
                                 path=tmp_path / "sensitivity.json", device=torch.device("cpu"),
                                 say=said.append)
    assert result["levels"]["samples"] == sens.MIN_SAMPLES
    assert "measured on the first 64" in said[0] and "15 passes over 359" in said[0]


def test_layers_that_tie_in_accuracy_are_grouped_by_how_far_their_outputs_moved() -> None:
    layers = {name: {"bits": {"4": 0.0}, "sparsity": {"0.5": 0.0},
                     "divergence": {"bits 4": moved, "sparsity 0.5": moved}}
              for name, moved in (("a", 0.3), ("b", 0.01), ("c", 0.2), ("d", 0.02))}
    groups = sens.sensitivity_groups({"layers": layers}, 2)
    assert groups == {"b": "group1", "d": "group1", "c": "group2", "a": "group2"}
