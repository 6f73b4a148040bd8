"""Search around the best (``search.refine``): a front trial with one layer's choice changed."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import optuna
import pytest

from slimsearch.experiment import SpaceConfig
from slimsearch.search import refine
from slimsearch.spaces import SearchSpace
from slimsearch.tasks import Task

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = SpaceConfig(bits=(4, 8, 32), sparsity=(0.0, 0.5), student_init=("slice",),
                    student={"width": (1.0,), "depth": (2,)})
# the teacher lost much with hidden.0 at 4 bits, nothing with hidden.1 or the head
SENSITIVITY = {"layers": {
    "hidden.0": {"bits": {"4": 0.20, "8": 0.001}, "sparsity": {"0.5": 0.30}},
    "hidden.1": {"bits": {"4": 0.0, "8": 0.0}, "sparsity": {"0.5": 0.01}},
    "head": {"bits": {"4": 0.0, "8": 0.0}, "sparsity": {"0.5": 0.02}}}}


def _study_with(space: SearchSpace, recipes_and_values: list[tuple[dict, list[float]]]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for params, values in recipes_and_values:
        study.enqueue_trial(params)
        trial = study.ask()
        space.suggest(trial)
        study.tell(trial, values)
    return study


def _params(bits: dict[str, int]) -> dict:
    return {**{f"{n}.bits": b for n, b in bits.items()},
            **{f"{n}.sparsity": 0.0 for n in bits}}


@pytest.fixture
def space(digits_mlp_task: Task) -> SearchSpace:
    return SearchSpace(digits_mlp_task, SPACE)


def test_smaller_goes_first_where_the_teacher_lost_least(space: SearchSpace) -> None:
    start = _params({"hidden.0": 8, "hidden.1": 8, "head": 8})
    study = _study_with(space, [(start, [0.95, 1000, 0.1])])
    moves = refine._moves(study.trials[0].params, space, SENSITIVITY, "smaller")
    ranked = [(name, value) for _, name, value in sorted(moves, key=lambda m: m[0])]
    assert ranked[-1] == ("hidden.0.sparsity", 0.5)  # cost 0.30: tried last
    assert ranked[0] in {("hidden.1.bits", 4), ("head.bits", 4)}  # cost 0


def test_more_accurate_gives_back_bits_where_the_teacher_lost_most(space: SearchSpace) -> None:
    start = _params({"hidden.0": 4, "hidden.1": 4, "head": 8})
    study = _study_with(space, [(start, [0.8, 500, 0.1])])
    moves = sorted(refine._moves(study.trials[0].params, space, SENSITIVITY, "more accurate"),
                   key=lambda m: m[0])
    assert (moves[0][1], moves[0][2]) == ("hidden.0.bits", 8)


def test_a_proposal_is_a_neighbour_of_the_front_never_tried_before(space: SearchSpace) -> None:
    start = _params({"hidden.0": 8, "hidden.1": 8, "head": 8})
    study = _study_with(space, [(start, [0.95, 1000, 0.1])])
    seen = [study.trials[0].params]
    for _ in range(40):
        proposal = refine.propose(study, space, SENSITIVITY, rng=random.Random(len(seen)))
        if proposal is None:  # every neighbour of the front was tried
            break
        params, change = proposal
        assert change.startswith("trial ")
        assert not any(all(s.get(k) == v for k, v in params.items()) for s in seen)
        study.enqueue_trial(params)
        trial = study.ask()
        space.suggest(trial)
        study.tell(trial, [0.95, 1000, 0.1])  # a tie: every trial stays on the front
        seen.append(trial.params)
    # 3 layers x 3 bit widths x 2 sparsities x 2 methods: many neighbours, none twice
    assert len(seen) > 10
    assert len({tuple(sorted(s.items())) for s in seen}) == len(seen)


def _told(study: optuna.Study, space: SearchSpace, params: dict, figures: tuple[float, int, float],
          interval: tuple[float, float] | None = None, **attrs: str) -> None:
    """A completed trial with ``params``, its metrics ``figures`` (validation accuracy, bytes,
    ms), the interval of its latency reading's ratio to the teacher if given, and user
    attributes ``attrs`` (``baseline="uniform-int8"`` for a seeded one)."""
    metrics = dict(zip(("val_accuracy", "size_bytes", "latency_ms"), figures, strict=True))
    if interval is not None:
        metrics.update(latency_ratio_low=interval[0], latency_ratio_high=interval[1])
    study.enqueue_trial(params, user_attrs={**attrs, "metrics": metrics})
    trial = study.ask()
    space.suggest(trial)
    study.tell(trial, list(figures))


def _int8_baseline(space: SearchSpace) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    _told(study, space, _params({"hidden.0": 8, "hidden.1": 8, "head": 8}), (0.90, 1000, 1.0),
          baseline="uniform-int8")
    return study


def test_a_trial_level_in_accuracy_with_a_baseline_buys_accuracy_with_bits(
        space: SearchSpace) -> None:
    study = _int8_baseline(space)
    # smaller and faster than the baseline, but only as accurate: bits back where the
    # teacher lost most at 4 bits (hidden.0), never a float layer (slower)
    _told(study, space, _params({"hidden.0": 4, "hidden.1": 4, "head": 8}), (0.90, 500, 0.9))
    params, change = refine._toward_baselines(study, space, SENSITIVITY, [],
                                              rng=random.Random(0))
    assert params["hidden.0.bits"] == 8 and params["hidden.1.bits"] == 4
    assert change == "trial 1: hidden.0.bits 4 -> 8, toward beating uniform-int8"


def test_a_trial_as_fast_as_a_baseline_buys_speed_with_structured_pruning(
        space: SearchSpace) -> None:
    study = _int8_baseline(space)
    # more accurate and smaller, but the same kernels: as fast. Unstructured zeros make no
    # kernel faster, whole outputs removed do; bits change no speed
    faster = dict(_params({"hidden.0": 4, "hidden.1": 4, "head": 8}),
                  **{"hidden.0.sparsity": 0.5, "hidden.0.pruning": "unstructured"})
    _told(study, space, faster, (0.92, 500, 1.0))
    params, change = refine._toward_baselines(study, space, SENSITIVITY, [],
                                              rng=random.Random(0))
    assert {k: v for k, v in params.items() if not k.startswith("student.")} == dict(
        faster, **{"hidden.0.pruning": "structured"})
    assert change.endswith("hidden.0.pruning unstructured -> structured, toward beating "
                           "uniform-int8")
    # tried already: nothing else moves it toward the baseline's speed
    assert refine._toward_baselines(study, space, SENSITIVITY, [params],
                                    rng=random.Random(0)) is None


def test_a_trial_faster_only_within_the_readings_noise_has_not_beaten_the_baseline(
        space: SearchSpace) -> None:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    _told(study, space, _params({"hidden.0": 8, "hidden.1": 8, "head": 8}), (0.90, 1000, 1.0),
          (0.095, 0.105), baseline="uniform-int8")
    # more accurate, smaller, and 2% faster by a reading whose interval overlaps the
    # baseline's: as fast, to the chase, which buys speed from it
    faster = dict(_params({"hidden.0": 4, "hidden.1": 4, "head": 8}),
                  **{"hidden.0.sparsity": 0.5, "hidden.0.pruning": "unstructured"})
    _told(study, space, faster, (0.92, 500, 0.98), (0.093, 0.103))
    params, change = refine._toward_baselines(study, space, SENSITIVITY, [],
                                              rng=random.Random(0))
    assert change.startswith("trial 1: hidden.0.pruning unstructured -> structured")
    # a reading that can tell: beaten, nothing left to chase
    decided = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    _told(decided, space, _params({"hidden.0": 8, "hidden.1": 8, "head": 8}), (0.90, 1000, 1.0),
          (0.095, 0.105), baseline="uniform-int8")
    _told(decided, space, faster, (0.92, 500, 0.9), (0.085, 0.094))
    assert refine._toward_baselines(decided, space, SENSITIVITY, [],
                                    rng=random.Random(0)) is None


@pytest.mark.parametrize(("multiple", "step"), [(1, 0.75), (128, None)])
def test_a_step_the_channel_multiple_rounds_away_is_not_taken(
        digits_mlp_task: Task, multiple: int, step: float | None) -> None:
    """256 outputs kept in multiples of 128: 75% pruned keeps 128, as 50% does."""
    space = SearchSpace(digits_mlp_task, dataclasses.replace(
        SPACE, sparsity=(0.0, 0.5, 0.75), channel_multiple=multiple))
    study = _int8_baseline(space)
    faster = dict(_params({"hidden.0": 4, "hidden.1": 4, "head": 8}),
                  **{"hidden.0.sparsity": 0.5, "hidden.0.pruning": "structured"})
    _told(study, space, faster, (0.92, 500, 1.0))
    found = refine._toward_baselines(study, space, SENSITIVITY, [], rng=random.Random(0))
    assert (found[0]["hidden.0.sparsity"] if found else None) == step


def _teacher_shaped(bits: dict[str, int]) -> dict:
    return dict(_params(bits), **{"student.width": 1.0, "student.depth": 2})


def _with_students(task: Task, **changes) -> SearchSpace:
    return SearchSpace(task, dataclasses.replace(
        SPACE, student={"width": (0.25, 0.5, 0.75, 1.0), "depth": (2,)},
        student_init=("slice", "scratch"), pruning=("structured", "unstructured"), **changes))


def test_a_narrower_student_is_a_move_that_starts_from_the_teacher(digits_mlp_task: Task) -> None:
    space = _with_students(digits_mlp_task)
    study = _study_with(space, [(_teacher_shaped({"hidden.0": 8, "hidden.1": 8, "head": 8}),
                                 [0.95, 1000, 0.1])])
    params = study.trials[0].params
    assert "student.init" not in params  # the teacher's shape: nothing to choose
    assert ("student.width", 0.75) in [(n, v) for _, n, v in refine._moves(
        params, space, SENSITIVITY, "smaller")]
    assert not any(n.startswith("student.") for _, n, _ in refine._moves(
        params, space, SENSITIVITY, "more accurate"))  # no wider student than the teacher
    moved = refine._neighbour(space, params, "student.width", 0.75)
    assert moved == dict(params, **{"student.width": 0.75, "student.init": "slice"})
    recipe = space.suggest(optuna.trial.FixedTrial(moved))
    assert recipe.student["width"] == 0.75 and recipe.student_init == "slice"
    assert recipe.layers == space.suggest(optuna.trial.FixedTrial(params)).layers


def test_a_student_step_the_channel_multiple_rounds_away_goes_on_to_the_next_width(
        digits_mlp_task: Task) -> None:
    """256 hidden units pruned by half and kept in multiples of 128 keep 128, and so do 192
    and 128 (the widths 0.75 and 0.5); 64 (width 0.25) keeps 64."""
    space = _with_students(digits_mlp_task, channel_multiple=128)
    pruned = dict(_teacher_shaped({"hidden.0": 8, "hidden.1": 8, "head": 8}),
                  **{"hidden.0.sparsity": 0.5, "hidden.0.pruning": "structured",
                     "hidden.1.sparsity": 0.5, "hidden.1.pruning": "structured"})
    study = _study_with(space, [(pruned, [0.95, 1000, 0.1])])
    moves = [(n, v) for _, n, v in refine._moves(study.trials[0].params, space, SENSITIVITY,
                                                 "smaller") if n.startswith("student.")]
    assert moves == [("student.width", 0.25)]


def test_the_chase_starts_from_the_baseline_itself_with_a_step_that_can_be_faster(
        digits_mlp_task: Task) -> None:
    space = _with_students(digits_mlp_task)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    _told(study, space, _teacher_shaped({"hidden.0": 8, "hidden.1": 8, "head": 8}), (0.90, 1000, 1.0),
          baseline="uniform-int8")
    # no searched trial yet: only a step that removes outputs can beat it in speed; bits or
    # zeros change no kernel
    params, change = refine._toward_baselines(study, space, SENSITIVITY, [],
                                              rng=random.Random(0))
    assert change == ("baseline uniform-int8: student.width 1.0 -> 0.75, toward beating "
                      "uniform-int8")
    assert params["student.width"] == 0.75 and params["hidden.0.bits"] == 8
    assert refine._toward_baselines(study, space, SENSITIVITY, [params],
                                    rng=random.Random(0)) is None


def test_the_chase_from_a_baseline_keeps_its_first_layer_whole_first(digits_mlp_task: Task) -> None:
    space = _with_students(digits_mlp_task)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    pruned = dict(_teacher_shaped({"hidden.0": 8, "hidden.1": 8, "head": 8}),
                  **{"hidden.0.sparsity": 0.5, "hidden.0.pruning": "structured",
                     "hidden.1.sparsity": 0.5, "hidden.1.pruning": "structured"})
    _told(study, space, pruned, (0.90, 1000, 1.0), baseline="structured-50%")
    # smaller and faster, as accurate: a trial short of it, with bits to give back
    _told(study, space, dict(pruned, **{"hidden.1.bits": 4, "head.bits": 4}), (0.90, 500, 0.9))
    for seed in range(10):  # before the trials short of it, whatever the draw
        params, change = refine._toward_baselines(study, space, SENSITIVITY, [],
                                                  rng=random.Random(seed))
        assert change == ("baseline structured-50%: hidden.0.sparsity 0.5 -> 0.0, toward "
                          "beating structured-50%")
    assert params == {k: v for k, v in pruned.items() if k != "hidden.0.pruning"} | {
        "hidden.0.sparsity": 0.0}
    # once: then the baseline and the trial short of it take turns again
    sources = {refine._toward_baselines(study, space, SENSITIVITY, [params],
                                        rng=random.Random(seed))[1].split(":")[0]
               for seed in range(10)}
    assert sources == {"baseline structured-50%", "trial 1"}
    assert "hidden.0.sparsity 0.5 -> 0.0" not in refine._toward_baselines(
        study, space, SENSITIVITY, [params], rng=random.Random(0))[1]
    assert refine._first_layer_whole(pruned, space)[1] == "hidden.0.sparsity 0.5 -> 0.0"
    # whole already, or pruned by zeros only (no output removed): no such step
    for first in ({"hidden.0.sparsity": 0.0}, {"hidden.0.pruning": "unstructured"}):
        params = {k: v for k, v in pruned.items() if k != "hidden.0.pruning" or
                  "hidden.0.sparsity" not in first} | first
        assert refine._first_layer_whole(params, space) is None
    # a student knob that narrows every hidden layer cannot make the first one whole alone
    narrow = dict(pruned, **{"student.width": 0.5, "student.init": "slice"})
    assert refine._first_layer_whole(narrow, space) is None


def test_a_first_layer_a_student_knob_narrowed_is_made_whole_by_that_knob() -> None:
    """digits-cnn's half-width student has 8 of conv1's 16 channels before it is pruned:
    the first layer is whole again with width1 at the teacher's value and no pruning there,
    and every other layer keeps its outputs."""
    from slimsearch.experiment import load_experiment
    from slimsearch.tasks import make_task

    config = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "digits_cnn.toml")
    task = make_task(config.task, seed=0, base_dir=config.base_dir, metrics=config.metrics,
                     options=config.task_options)
    space = SearchSpace(task, config.space)
    half = space.params_of(space.baselines()["half-width-structured-50%-int8"])
    step, change = refine._first_layer_whole(half, space)
    assert change == "conv1.sparsity 0.5 -> 0.0, student.width1 0.5 -> 1.0"
    assert step == {k: v for k, v in half.items() if k != "conv1.pruning"} | {
        "conv1.sparsity": 0.0, "student.width1": 1.0}
    before, after = refine._shapes(space, half), refine._shapes(space, step)
    assert (before["conv1"], after["conv1"]) == (8, 16)
    assert {k: v for k, v in after.items() if k != "conv1"} == {
        k: v for k, v in before.items() if k != "conv1"}


def test_a_trial_short_in_bytes_takes_bits_from_a_layer_large_enough_to_close_the_gap(
        space: SearchSpace) -> None:
    """hidden.0 64 x 256, hidden.1 256 x 256, head 256 x 10 weights: 4 bits fewer on the
    head save at most 1280 bytes, on hidden.1 32768."""
    cheap_head = {"layers": {**SENSITIVITY["layers"],
                             "hidden.1": {"bits": {"4": 0.001}, "sparsity": {"0.5": 0.01}}}}
    faster = dict(_params({"hidden.0": 8, "hidden.1": 8, "head": 8}),
                  **{"hidden.0.sparsity": 0.5, "hidden.0.pruning": "structured"})
    # the head costs least accuracy: its step goes first where it can close the gap
    for gap, step in ((1000, "head.bits 8 -> 4"), (5000, "hidden.1.bits 8 -> 4")):
        study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
        _told(study, space, _params({"hidden.0": 8, "hidden.1": 8, "head": 8}),
              (0.90, 100_000, 1.0), baseline="uniform-int8")
        _told(study, space, faster, (0.92, 100_000 + gap, 0.9))  # larger: short in bytes
        changes = {refine._toward_baselines(study, space, cheap_head, [],
                                            rng=random.Random(seed))[1] for seed in range(10)}
        # half the time the chase starts from the baseline itself, with a structured step
        assert f"trial 1: {step}, toward beating uniform-int8" in changes
        assert not [c for c in changes if c.startswith("trial 1") and step not in c]


def test_the_baseline_itself_and_the_trials_short_of_it_take_turns(digits_mlp_task: Task) -> None:
    space = _with_students(digits_mlp_task)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    _told(study, space, _teacher_shaped({"hidden.0": 8, "hidden.1": 8, "head": 8}),
          (0.90, 1000, 1.0), baseline="uniform-int8")
    _told(study, space, _teacher_shaped({"hidden.0": 4, "hidden.1": 4, "head": 8}),
          (0.90, 500, 0.9))  # smaller and faster, as accurate: bits back would beat it
    sources = {refine._toward_baselines(study, space, SENSITIVITY, [], rng=random.Random(seed)
                                        )[1].split(":")[0] for seed in range(10)}
    assert sources == {"baseline uniform-int8", "trial 1"}


def test_more_zeros_are_a_step_where_more_structured_pruning_is_rounded_away(
        digits_mlp_task: Task) -> None:
    """256 outputs kept in multiples of 128: 75% pruned structured keeps 128, as 50% does,
    so the step is the same model again; 75% of zeros is another model than 50% (before, a
    step between two nonzero sparsities of a layer pruned unstructured was never taken)."""
    space = SearchSpace(digits_mlp_task, dataclasses.replace(
        SPACE, sparsity=(0.0, 0.5, 0.75), channel_multiple=128))
    for method, rounded_away in (("structured", True), ("unstructured", False)):
        before = dict(_teacher_shaped({"hidden.0": 8, "hidden.1": 8, "head": 8}),
                      **{"hidden.0.sparsity": 0.5, "hidden.0.pruning": method})
        study = _study_with(space, [(before, [0.95, 1000, 0.1])])
        proposals = set()
        for seed in range(20):
            found = refine.propose(study, space, SENSITIVITY, rng=random.Random(seed))
            proposals.add(found[1] if found else None)
        assert ("trial 0: hidden.0.sparsity 0.5 -> 0.75" not in proposals) is rounded_away


def test_a_trial_points_behind_a_baseline_is_left_to_the_sampler(space: SearchSpace) -> None:
    study = _int8_baseline(space)
    # smaller and faster, but 3 points less accurate: one layer's bits will not close that
    _told(study, space, _params({"hidden.0": 4, "hidden.1": 4, "head": 8}), (0.87, 500, 0.9))
    assert refine._toward_baselines(study, space, SENSITIVITY, [], rng=random.Random(0)) is None


def test_no_step_toward_a_baseline_a_searched_trial_beats_already(space: SearchSpace) -> None:
    study = _int8_baseline(space)
    _told(study, space, _params({"hidden.0": 8, "hidden.1": 4, "head": 4}), (0.90, 500, 0.9))
    _told(study, space, _params({"hidden.0": 8, "hidden.1": 4, "head": 8}), (0.91, 600, 0.9))
    assert refine._toward_baselines(study, space, SENSITIVITY, [], rng=random.Random(0)) is None


def test_refinement_is_due_for_its_share_after_the_first_trials() -> None:
    assert not any(refine.due(n, completed=n, share=0.5) for n in range(refine.START_AFTER))
    after = [refine.due(n, completed=n, share=0.25)
             for n in range(refine.START_AFTER, refine.START_AFTER + 40)]
    assert sum(after) == 10
    assert not any(refine.due(n, completed=n, share=0.0) for n in range(100))


@pytest.mark.slow
def test_a_search_refines_its_front_for_its_share(tmp_path, monkeypatch) -> None:
    from slimsearch.cli import main
    from slimsearch.run import load_study

    monkeypatch.setattr(refine, "START_AFTER", 3)
    experiment = tmp_path / "refine.toml"
    experiment.write_text('name = "refine"\ntask = "digits-mlp"\nseed = 0\n\n'
                          '[search]\ntrials = 9\nrefine = 0.5\n\n'
                          '[space]\nbits = [4, 8, 32]\nsparsity = [0.0, 0.5]\n\n'
                          '[train]\nteacher_epochs = 4\ndistill_epochs = 1\nfinetune_epochs = 1\n'
                          'qat_epochs = 1\n\n[target]\ndevice = "cpu"\n')
    assert main(["run", str(experiment), "--run-dir", str(tmp_path / "run")]) == 0
    trials = load_study(tmp_path / "run").trials
    refined = [t for t in trials if "refine" in t.user_attrs]
    assert len(refined) >= 2 and all(t.number >= 3 for t in refined)
    baselines = {t.user_attrs["baseline"]: t for t in trials if "baseline" in t.user_attrs}
    for t in refined:  # one parameter away from the trial (or baseline) it names
        kind, name = t.user_attrs["refine"].split(":")[0].split()
        source = trials[int(name)] if kind == "trial" else baselines[name]
        differ = {k for k in t.params if source.params.get(k) != t.params[k]}
        assert len(differ - {k for k in t.params if ".pruning" in k or k == "student.init"}
                   ) <= 1, differ


def test_an_interrupted_refinement_runs_again_as_a_refinement() -> None:
    from optuna.trial import TrialState

    from slimsearch.search.recovery import RETRY_OF, enqueue_again

    study = optuna.create_study()
    study.enqueue_trial({"x": 1}, user_attrs={"refine": "trial 3: fc.bits 8 -> 4"})
    trial = study.ask()
    trial.suggest_categorical("x", [1, 2])
    enqueue_again(study, trial)
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    assert waiting.user_attrs == {RETRY_OF: trial.number, "refine": "trial 3: fc.bits 8 -> 4"}
