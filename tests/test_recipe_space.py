"""Recipes as validated plain data, and the search space that turns Optuna trials into them."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest

from slimsearch.errors import ConfigError
from slimsearch.experiment import SpaceConfig
from slimsearch.spaces import LayerRecipe, Recipe, SearchSpace
from slimsearch.tasks import Task

optuna.logging.set_verbosity(optuna.logging.WARNING)

MLP_LAYERS = ["hidden.0", "hidden.1", "head"]


def sample_recipe() -> Recipe:
    return Recipe(student={"width": 0.5, "depth": 2}, student_init="scratch",
                  layers={"hidden.0": LayerRecipe(sparsity=0.5, pruning="structured", bits=4),
                          "hidden.1": LayerRecipe(sparsity=0.25, pruning="unstructured", bits=8),
                          "head": LayerRecipe(bits=32)})


def test_recipe_json_round_trip() -> None:
    recipe = sample_recipe()
    text = recipe.to_json()
    data = json.loads(text)
    assert data["type"] == "slimsearch.Recipe" and data["version"] == 1
    assert data["layers"]["hidden.0"] == {"sparsity": 0.5, "pruning": "structured", "bits": 4}
    again = Recipe.from_json(text)
    assert again == recipe
    assert isinstance(again.layers["hidden.0"], LayerRecipe)
    assert again != Recipe.from_json(text.replace('"bits": 4', '"bits": 2'))


def test_recipe_layer_defaults_to_uncompressed() -> None:
    assert sample_recipe().layer("not-there") == LayerRecipe(sparsity=0.0, pruning="unstructured", bits=32)


@pytest.mark.parametrize("bits", [1, 16, 0, 64])
def test_layer_recipe_rejects_bit_widths_outside_the_allowed_set(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        LayerRecipe(bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 32])
def test_layer_recipe_accepts_allowed_bit_widths(bits: int) -> None:
    assert LayerRecipe(bits=bits).bits == bits


@pytest.mark.parametrize("sparsity", [0.99, 1.0, -0.1])
def test_layer_recipe_rejects_sparsity_out_of_range(sparsity: float) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        LayerRecipe(sparsity=sparsity)


def test_layer_recipe_and_recipe_reject_unknown_names() -> None:
    with pytest.raises(ValueError, match="pruning"):
        LayerRecipe(sparsity=0.5, pruning="random")
    with pytest.raises(ValueError, match="student_init"):
        Recipe(student_init="warm")
    with pytest.raises(ValueError, match="LayerRecipe"):
        Recipe(layers={"head": {"bits": 8}})  # type: ignore[dict-item]


@pytest.mark.parametrize("change", [{"type": "other.Recipe"}, {"version": 2}, {"type": None}])
def test_from_dict_rejects_other_types_and_versions(change: dict) -> None:
    data = {**sample_recipe().to_dict(), **change}
    with pytest.raises(ValueError, match="slimsearch.Recipe"):
        Recipe.from_dict(data)


def test_head_may_only_be_pruned_unstructured(digits_mlp_task: Task) -> None:
    space = SearchSpace(digits_mlp_task, SpaceConfig())
    infos = space.layers_for(dict(digits_mlp_task.teacher_kwargs))
    assert [i.name for i in infos] == MLP_LAYERS
    assert {i.name: i.structured_ok for i in infos} == {"hidden.0": True, "hidden.1": True, "head": False}
    assert {i.kind for i in infos} == {"Linear"}
    shallow = space.layers_for({"width": 0.5, "depth": 1})
    assert [(i.name, i.structured_ok) for i in shallow] == [("hidden.0", True), ("head", False)]


def _check_valid(recipe: Recipe, space: SearchSpace) -> None:
    config, task = space.config, space.task
    for knob, choices in space.student_choices.items():
        assert recipe.student[knob] in choices
    assert recipe.student_init in config.student_init
    if recipe.student == dict(task.teacher_kwargs):
        assert recipe.student_init == "slice"
    infos = space.layers_for(recipe.student)
    assert list(recipe.layers) == [i.name for i in infos]
    for info in infos:
        layer = recipe.layers[info.name]
        assert layer.bits in config.bits and layer.sparsity in config.sparsity
        assert layer.pruning in config.pruning or layer.pruning == "unstructured"
        if not info.structured_ok:
            assert layer.pruning == "unstructured"


def test_suggest_gives_valid_recipes_that_params_of_reproduces(digits_mlp_task: Task) -> None:
    space = SearchSpace(digits_mlp_task, SpaceConfig())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    recipes = []
    for _ in range(40):
        trial = study.ask()
        recipe = space.suggest(trial)
        _check_valid(recipe, space)
        assert trial.params == space.params_of(recipe)
        recipes.append(recipe)
    assert len({r.to_json() for r in recipes}) > 30  # the space is really explored
    assert {r.student["depth"] for r in recipes} == {1, 2}
    for recipe in recipes[:10]:  # enqueue the parameters into a fresh study: the same recipe again
        fresh = optuna.create_study()
        fresh.enqueue_trial(space.params_of(recipe))
        assert space.suggest(fresh.ask()) == recipe


EXPERT = ["teacher", "uniform-int8", "structured-50%-int8", "structured-75%-int8",
          "4-bit-weights", "structured-50%-4-bit", "half-width-student", "half-width-student-int8",
          "half-width-structured-50%-int8"]


def _round_trips(space: SearchSpace, recipe: Recipe) -> bool:
    study = optuna.create_study()
    study.enqueue_trial(space.params_of(recipe))
    return space.suggest(study.ask()) == recipe


@pytest.mark.parametrize(("config", "names"), [
    (SpaceConfig(), EXPERT),
    # 75% is not offered: the nearest sparsity is 50%, a recipe already there
    (SpaceConfig(bits=(4, 8, 32), sparsity=(0.0, 0.5), student_init=("slice",)),
     ["teacher", "uniform-int8", "structured-50%-int8", "4-bit-weights", "structured-50%-4-bit",
      "half-width-student", "half-width-student-int8", "half-width-structured-50%-int8"]),
], ids=["default", "narrow"])
def test_the_experts_first_recipes_are_baselines_that_round_trip(
        digits_mlp_task: Task, config: SpaceConfig, names: list[str]) -> None:
    space = SearchSpace(digits_mlp_task, config)
    baselines = space.baselines()
    assert list(baselines) == names
    teacher = dict(digits_mlp_task.teacher_kwargs)
    for name, recipe in baselines.items():
        assert _round_trips(space, recipe), name
        assert recipe.student_init == "slice"
        assert set(recipe.layers) == {i.name for i in space.layers_for(recipe.student)}
    layers = {name: list(r.layers.values()) for name, r in baselines.items()}
    assert {x.bits for x in layers["teacher"]} == {32} and baselines["teacher"].student == teacher
    assert {x.bits for x in layers["uniform-int8"]} == {8}
    assert {x.bits for x in layers["4-bit-weights"]} == {4}
    # structured 50%: every layer that may lose outputs does, the class outputs stay
    structured = baselines["structured-50%-int8"].layers
    assert structured["head"] == LayerRecipe(bits=8)
    assert all(structured[n] == LayerRecipe(sparsity=0.5, pruning="structured", bits=8)
               for n in ("hidden.0", "hidden.1"))
    assert baselines["structured-50%-4-bit"].layers == {
        n: dataclasses.replace(r, bits=4) for n, r in structured.items()}
    half = baselines["half-width-student"]
    assert half.student == {**teacher, "width": 0.5}  # depth kept: a width knob exists
    assert {x.bits for x in half.layers.values()} == {32}
    quantized = baselines["half-width-student-int8"]  # distilled, then quantized
    assert quantized.student == half.student
    assert {x.bits for x in quantized.layers.values()} == {8}


def test_in_a_grouped_space_structured_baselines_prune_the_other_members_unstructured(
        digits_mlp_task: Task) -> None:
    """A group shares its sparsity: the head, which cannot lose its class outputs, prunes
    unstructured beside hidden layers that lose whole outputs (as a BERT group mixes queries
    with keys and values); before, the baseline disagreed with its group and was dropped."""
    space = SearchSpace(digits_mlp_task, SpaceConfig(bits=(4, 8, 32), sparsity=(0.0, 0.5)))
    space.set_groups(dict.fromkeys(("hidden.0", "hidden.1", "head"), "group1"))
    baselines = space.baselines()
    assert "structured-50%-int8" in baselines
    structured = baselines["structured-50%-int8"]
    assert structured.layers["head"] == LayerRecipe(sparsity=0.5, pruning="unstructured", bits=8)
    assert structured.layers["hidden.0"] == LayerRecipe(sparsity=0.5, pruning="structured", bits=8)
    assert all(_round_trips(space, recipe) for recipe in baselines.values())
    # ungrouped, the head keeps its outputs and every weight (test above)
    assert SearchSpace(digits_mlp_task, SpaceConfig()).baselines()[
        "structured-50%-int8"].layers["head"] == LayerRecipe(bits=8)


def test_with_int8_activations_the_expert_recipes_run_int8_throughout(digits_mlp_task: Task) -> None:
    space = SearchSpace(digits_mlp_task, SpaceConfig(activations=(32, 8)))
    acts = {name: r.activation_bits for name, r in space.baselines().items()}
    assert acts == {"teacher": 32, "uniform-int8": 8, "structured-50%-int8": 8,
                    "structured-75%-int8": 8, "4-bit-weights": 8, "structured-50%-4-bit": 8,
                    "weight-only-4-bit": 32, "half-width-student": 32,
                    "half-width-student-int8": 8, "half-width-structured-50%-int8": 8}


def test_no_int8_baseline_without_8_bits(digits_mlp_task: Task) -> None:
    assert list(SearchSpace(digits_mlp_task, SpaceConfig(bits=(4, 32))).baselines()) == [
        "teacher", "4-bit-weights", "structured-50%-4-bit", "half-width-student"]


@pytest.mark.parametrize(("config", "names"), [
    (SpaceConfig(), EXPERT),
    (SpaceConfig(bits=(4, 8)), ["uniform-int8", "structured-50%-int8", "structured-75%-int8",
                                "4-bit-weights", "structured-50%-4-bit",
                                "half-width-student-int8",
                                "half-width-structured-50%-int8"]),
    (SpaceConfig(sparsity=(0.25, 0.5)), []),
    (SpaceConfig(student_init=("scratch",)), []),
    (SpaceConfig(pruning=("unstructured",)), ["teacher", "uniform-int8", "4-bit-weights",
                                              "half-width-student", "half-width-student-int8"]),
    (SpaceConfig(student={"width": (0.25, 0.5)}), ["half-width-student",
                                                   "half-width-student-int8",
                                                   "half-width-structured-50%-int8"]),
], ids=["default", "no-32-bits", "no-zero-sparsity", "scratch-only", "no-structured",
        "teacher-width-not-offered"])
def test_baselines_are_only_those_the_space_can_express(digits_mlp_task: Task, config: SpaceConfig,
                                                        names: list[str]) -> None:
    space = SearchSpace(digits_mlp_task, config)
    baselines = space.baselines()
    assert list(baselines) == names
    assert all(_round_trips(space, recipe) for recipe in baselines.values())


def test_suggested_recipes_are_contained_in_their_space(digits_mlp_task: Task) -> None:
    space = SearchSpace(digits_mlp_task, SpaceConfig(pruning=("structured",)))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        recipe = space.suggest(study.ask())
        assert space.contains(recipe)
        unpruned = [layer for layer in recipe.layers.values() if layer.sparsity == 0]
        assert all(layer.pruning == "unstructured" for layer in unpruned)
    assert not SearchSpace(digits_mlp_task, SpaceConfig(bits=(4, 8))).contains(space.baselines()["teacher"])


def test_unknown_student_knob_suggests_the_closest(digits_mlp_task: Task) -> None:
    with pytest.raises(ConfigError, match="space.student.widht") as info:
        SearchSpace(digits_mlp_task, SpaceConfig(student={"widht": (0.5,)}))
    assert "did you mean 'width'" in str(info.value).lower()


def test_student_knob_the_factory_rejects_fails_before_training(digits_mlp_task: Task) -> None:
    with pytest.raises(ConfigError, match="space.student"):
        SearchSpace(digits_mlp_task, SpaceConfig(student={"depth": ("two",)}))


def test_student_knob_choices_override_the_task_defaults(digits_mlp_task: Task) -> None:
    space = SearchSpace(digits_mlp_task, SpaceConfig(student={"width": (0.25, 0.5)}))
    assert space.student_choices == {"width": (0.25, 0.5), "depth": (1, 2)}
    other = SearchSpace(digits_mlp_task, SpaceConfig(student={"width": (0.25,)}))
    assert space.fingerprint() != other.fingerprint()
    assert space.fingerprint() == SearchSpace(digits_mlp_task, SpaceConfig(student={"width": (0.25, 0.5)})
                                              ).fingerprint()


def test_every_student_choice_is_built_up_front(digits_mlp_task: Task) -> None:
    """A bad value in the middle of a choice list fails before training, not in trial 37."""
    with pytest.raises(ConfigError, match="space.student"):
        SearchSpace(digits_mlp_task, SpaceConfig(student={"depth": (1, "two", 2)}))


def test_distillation_settings_are_searchable_and_round_trip(digits_mlp_task: Task) -> None:
    config = SpaceConfig(distillation={"temperature": (2.0, 4.0, 8.0), "epochs": (5.0,)})
    space = SearchSpace(digits_mlp_task, config)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        recipe = space.suggest(study.ask())
        assert set(recipe.distillation) == {"temperature", "epochs"}
        assert recipe.distillation["epochs"] == 5.0
        seen.add(recipe.distillation["temperature"])
        assert Recipe.from_json(recipe.to_json()) == recipe
        replay = optuna.create_study()
        replay.enqueue_trial(space.params_of(recipe))
        assert space.suggest(replay.ask()) == recipe
    assert len(seen) > 1


@pytest.mark.parametrize(("student", "half"), [
    # the conv stages at half, the hidden fc layer (the head's input) whole, as MobileNetV2
    ({"width1": (0.5, 1.0), "width2": (0.5, 1.0), "width3": (0.5, 1.0), "fc_width": (0.5, 1.0)},
     {"width1": 0.5, "width2": 0.5, "width3": 0.5, "fc_width": 1.0}),
    # the head's input is all a space's widths can narrow: then it is halved
    ({"width1": (1.0,), "width2": (1.0,), "width3": (1.0,), "fc_width": (0.5, 1.0)},
     {"width1": 1.0, "width2": 1.0, "width3": 1.0, "fc_width": 0.5}),
], ids=["stages-and-fc", "fc-only"])
def test_the_half_width_student_keeps_the_heads_input_whole_where_the_rest_narrows(
        student: dict, half: dict) -> None:
    from slimsearch.tasks import make_task

    task = make_task("digits-cnn", seed=0)
    space = SearchSpace(task, SpaceConfig(student=student))
    assert space.baselines()["half-width-student"].student == half


def test_unknown_distillation_key_names_the_field() -> None:
    with pytest.raises(ConfigError, match="space.distillation.temprature") as info:
        SpaceConfig(distillation={"temprature": (2.0,)})
    assert "did you mean 'temperature'" in str(info.value).lower()


def test_two_four_is_only_offered_where_the_inputs_come_in_fours() -> None:
    from slimsearch.tasks import make_task

    task = make_task("digits-cnn", seed=0)
    space = SearchSpace(task, SpaceConfig(pruning=("structured", "unstructured", "2:4"),
                                          sparsity=(0.5,)))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    methods = {name: set() for name in ("conv1", "conv2", "fc1")}
    for _ in range(30):
        recipe = space.suggest(study.ask())
        assert space.contains(recipe)
        replay = optuna.create_study()
        replay.enqueue_trial(space.params_of(recipe))
        assert space.suggest(replay.ask()) == recipe
        for name in methods:
            methods[name].add(recipe.layers[name].pruning)
    assert methods["conv1"] == {"structured", "unstructured"}  # 1 channel x 3x3 = 9 inputs
    assert "2:4" in methods["conv2"] and "2:4" in methods["fc1"]


def test_distillation_choices_respect_the_train_limits() -> None:
    for bad in ({"temperature": (0.0, 4.0)}, {"alpha": (1.5,)}, {"epochs": (2.5,)}):
        with pytest.raises(ConfigError, match="space.distillation"):
            SpaceConfig(distillation=bad)


def test_the_size_bound_is_below_every_file_the_space_can_build(digits_mlp_task: Task,
                                                                  tmp_path) -> None:
    import torch

    from slimsearch.compression import build, save_artifact
    from slimsearch.experiment import TrainConfig

    config = SpaceConfig(bits=(4, 8, 32), sparsity=(0.0, 0.5),
                         student={"width": (0.25, 0.5), "depth": (1, 2)})
    space = SearchSpace(digits_mlp_task, config)
    bound = space.min_weight_bytes()
    # the smallest student's weights (width 0.25, depth 1), half of them kept, 4 bits each
    small = space.layers_for(dict(digits_mlp_task.teacher_kwargs, width=0.25, depth=1))
    assert bound == int(sum(i.weights for i in small) * 0.5 * 4 / 8) > 0
    teacher = digits_mlp_task.make_model(**digits_mlp_task.teacher_kwargs)
    logits = torch.zeros(len(digits_mlp_task.train.y), 10)
    no_training = TrainConfig(distill_epochs=0, finetune_epochs=0, qat_epochs=0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for number in range(8):  # random recipes, and the smallest one the space holds
        recipe = space.suggest(study.ask())
        if number == 0:
            recipe = Recipe(student={"width": 0.25, "depth": 1}, student_init="scratch",
                            layers={i.name: LayerRecipe(
                                sparsity=0.5, bits=4,
                                pruning="structured" if i.structured_ok else "unstructured")
                                for i in small})
            assert space.contains(recipe)
        compressed = build(digits_mlp_task, teacher, logits, recipe, train=no_training, seed=0,
                           device=torch.device("cpu"))
        size = save_artifact(compressed, tmp_path / f"{number}.safetensors").stat().st_size
        assert size >= bound, recipe.summary()


def test_seeded_trials_put_the_sensitivity_starts_before_the_experts_and_leave_half() -> None:
    from slimsearch.search.optuna_backend import seeded

    def recipe(bits: int) -> Recipe:
        return Recipe(student={}, layers={"fc": LayerRecipe(bits=bits)})

    baselines = {"teacher": recipe(32), "uniform-int8": recipe(8), "4-bit-weights": recipe(4),
                 "expert": recipe(2)}
    starts = {"within 0.5%": recipe(6), "within 2%": recipe(4)}  # the second is a baseline
    order = [(kind, name) for kind, name, _ in seeded(baselines, starts, budget=100)]
    assert order == [("baseline", "teacher"), ("baseline", "uniform-int8"),
                     ("start", "within 0.5%"), ("baseline", "4-bit-weights"),
                     ("baseline", "expert")]
    assert [name for _, name, _ in seeded(baselines, starts, budget=5)] == [
        "teacher", "uniform-int8", "within 0.5%"]


def test_the_benchmarks_hand_made_recipes_are_the_seeded_baselines_of_the_same_method() -> None:
    """benchmarks/beat_expert.py asks whether a searched trial beats each hand-made recipe of
    benchmarks/compression.py. Where a seeded baseline is the same method, it must be the
    same recipe: the same model file, and one latency reading of its one executed form
    (spelled apart, the half-width student once had a second reading, and timing noise
    decided whether a trial of its form was faster)."""
    import importlib.util
    from pathlib import Path

    from slimsearch.experiment import load_experiment
    from slimsearch.tasks import make_task

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("compression", root / "benchmarks" /
                                                  "compression.py")
    compression = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compression)
    config = load_experiment(root / "experiments" / "digits_cnn.toml")
    space = SearchSpace(make_task("digits-cnn", seed=0), config.space)
    hand_made = compression.recipes(space.task, space)
    baselines = space.baselines()
    twins = {"teacher (fp32)": "teacher", "int8 weights + int8 activations": "uniform-int8",
             "4-bit weights": "weight-only-4-bit", "student width 0.5, sliced": "half-width-student",
             "structured 50% + int8 w+a": "structured-50%-int8",
             "structured 50% + 4-bit w + int8 a": "structured-50%-4-bit",
             "structured 75% + int8 w+a": "structured-75%-int8",
             "width 0.5 sliced + structured 50% + int8 w+a": "half-width-structured-50%-int8"}
    for label, name in twins.items():
        assert hand_made[label] == baselines[name], label
