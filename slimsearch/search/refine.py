"""Search around the best: a Pareto trial with one layer's choice (or one student knob) changed.

A sampler proposes whole recipes; near a good one it is slow, since every proposal changes
every layer at once. An expert's next step from a good point is one layer at a time: fewer
bits or more sparsity where the layer tolerates it (smaller, faster), more bits or less
sparsity where it hurts most (more accurate), structured pruning where it was unstructured
(faster). ``propose`` picks a trial of the current front and such a change, guided by the
sensitivity pre-pass (``search.sensitivity``), and returns the Optuna parameters of the
neighbour, or None when every neighbour of the front was tried already. ``search.refine`` is
the share of trials, after the first ``START_AFTER`` completed ones, that run one.

Half of those moves (at random) go after the expert instead: a seeded baseline (the
recipes an expert tries first) that no searched trial beats in every objective yet (faster
by latency readings whose intervals overlap does not count: ``run.undecided``). A
searched trial that beats it in two objectives and not in the third (often a tie: a trial
that runs the same kernels is exactly as fast, and a few hundred validation samples make ties in
accuracy common) spends some of its lead on the third, one layer at a time: a step of bits up
for accuracy (or, with speed to spare, any step toward it), of structured sparsity or a
narrower student for speed, of bits down for bytes. The nearer it is, the sooner; one too far
behind (``REACH``) is left to the sampler.

The chase may also start from the baseline itself (half the time before the trials short of
it, half the time after): a step that removes outputs (a student knob one value narrower,
more structured sparsity) can make it faster, and a narrower student is distilled from the
teacher, so it can be more accurate too. Its first step keeps the first layer whole where
the baseline prunes or narrows it: that layer's kernel costs little more with more outputs (on our
test CPU, less), and it is the one an expert leaves whole (``_first_layer_whole``).

A student knob (``student.width1``) is a move like a layer's choice: one value narrower
(smaller) or wider (more accurate), skipping values whose layers keep as many outputs
(structured pruning keeps multiples of ``space.channel_multiple``: a 12-channel stage pruned
by half keeps 8, as a 16-channel one does). A lower value is a smaller student.

The neighbour is a parameter change: a group of layers (space.groups) changes together, and
a choice that brings a new conditional parameter along (a pruning method once sparsity
becomes positive, a layer a deeper student adds) is left to the sampler. A student knob
brings its own: every layer keeps its choices, and a student narrower than the teacher
starts from the teacher's weights (``student.init`` "slice") where the space allows it.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import TrialState

from slimsearch.compression.pruning import kept_channels
from slimsearch.run import OBJECTIVES, better_in, decidedly_better, undecided
from slimsearch.spaces import SearchSpace

#: Refinement waits for this many completed trials (the seeded ones and the sampler's first):
#: a front of a handful of points is mostly the seeds themselves.
START_AFTER = 10


def due(number: int, completed: int, share: float) -> bool:
    """Whether trial ``number`` (0-based) refines: after START_AFTER completed trials, every
    trial that brings the count of refinements up to ``share`` of the trials since then."""
    if share <= 0 or completed < START_AFTER:
        return False
    since = number - START_AFTER
    return int((since + 1) * share) > int(since * share)


def propose(study: optuna.Study, space: SearchSpace, sensitivity: dict[str, Any] | None, *,
            rng: random.Random) -> tuple[dict[str, Any], str] | None:
    """Parameters of an untried neighbour of a trial on the front, and what changed (for the
    trial's record: ``"trial 12: conv2.bits 8 -> 4"``); None when there is none left."""
    tried = [t.params for t in study.get_trials(deepcopy=False)
             if t.state != TrialState.FAIL]
    if rng.random() < 0.5 and (found := _toward_baselines(study, space, sensitivity, tried,
                                                          rng=rng)) is not None:
        return found
    front = list(study.best_trials)  # feasible trials only, when there are constraints
    rng.shuffle(front)
    directions = ["smaller", "more accurate"]
    rng.shuffle(directions)  # the other direction only when the first has no untried move
    for trial, toward in ((t, d) for d in directions for t in front):
        moves = sorted(_moves(trial.params, space, sensitivity, toward), key=lambda m: m[0])
        for _, name, value in moves:
            params = _neighbour(space, trial.params, name, value)
            if params is None:
                continue
            if _rounded_away(space, name, trial.params, params):
                continue
            if not any(_same(params, other) for other in tried):
                return params, f"trial {trial.number}: {name} {trial.params[name]} -> {value}"
    return None


def _toward_baselines(study: optuna.Study, space: SearchSpace, sensitivity: dict[str, Any] | None,
                      tried: list[dict[str, Any]], *, rng: random.Random
                      ) -> tuple[dict[str, Any], str] | None:
    """Parameters of an untried step toward beating a seeded baseline in every objective,
    from the baseline itself (its first layer kept whole, then steps that remove outputs)
    or from a searched trial short of it in one objective, and what changed; None when
    every baseline is beaten or no such step is left."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "metrics" in t.user_attrs and "duplicate_of" not in t.user_attrs]
    searched = [t for t in done if not t.user_attrs.get("baseline")]
    unbeaten = [b for b in done if b.user_attrs.get("baseline") and not any(
        decidedly_better(t.user_attrs["metrics"], b.user_attrs["metrics"]) for t in searched)]
    rng.shuffle(unbeaten)
    for baseline in unbeaten:
        target = baseline.user_attrs["metrics"]
        near = sorted(((t, *found) for t in searched
                       if (found := _one_short(t.user_attrs["metrics"], target)) is not None
                       and found[1] <= REACH[found[0]]), key=lambda n: n[2])
        # Its first layer kept whole goes first, once: the expert's first step, and a single
        # trial. Then the baseline is as fast as itself: it is short of itself in speed
        # alone. Half the time it goes first, half the time after the trials short of it:
        # each kind would otherwise take every step before the other had one.
        name = baseline.user_attrs["baseline"]
        whole = _first_layer_whole(baseline.params, space)
        if whole is not None and not any(_same(whole[0], other) for other in tried):
            return whole[0], f"baseline {name}: {whole[1]}, toward beating {name}"
        itself = (baseline, "latency_ms", 0.0)
        starts = [itself, *near] if rng.random() < 0.5 else [*near, itself]
        for trial, short, _ in starts:
            moves = sorted(_moves(trial.params, space, sensitivity, SPENDING[short]),
                           key=lambda m: m[0])
            if short == "size_bytes":  # the steps that can close the gap first (sort is stable)
                gap = trial.user_attrs["metrics"]["size_bytes"] - target["size_bytes"]
                moves.sort(key=lambda m: not _can_save(space, trial.params, m[1], m[2], gap))
            slack = trial.user_attrs["metrics"]["latency_ms"] / target["latency_ms"]
            for _, parameter, value in moves:
                if not _buys(short, parameter, value, trial.params, slack=slack):
                    continue
                params = _neighbour(space, trial.params, parameter, value)
                if params is None:
                    continue
                if short == "latency_ms" and _same_shapes(space, trial.params, params):
                    continue  # the channel multiple rounds the step away
                if not any(_same(params, other) for other in tried):
                    source = f"baseline {name}" if trial is baseline else f"trial {trial.number}"
                    return params, (f"{source}: {parameter} {trial.params[parameter]} -> "
                                    f"{value}, toward beating {name}")
    return None


def _first_layer_whole(params: dict[str, Any], space: SearchSpace
                       ) -> tuple[dict[str, Any], str] | None:
    """The expert's first step from a recipe whose first layer has fewer outputs than the
    teacher's: that layer kept whole, as (parameters, what changed); None where it is whole
    already, pruned by zeros only, or cannot be made whole alone (it shares its choices with
    a group of layers, or the student knob that narrows it narrows others too).

    The layer is made whole by its sparsity set to 0 (structured pruning removed outputs)
    and, where a student knob narrowed it, that knob set to the teacher's value: the
    half-width student has half the first layer's outputs before it is pruned. Every other
    layer keeps as many outputs as it had.

    A CNN's first layer reads the image itself, at its full resolution and with few
    channels, and its kernel's time depends little on how many outputs it writes: on our
    test CPU, digits-cnn's fastest int8 recipes ran 4-5% faster with that layer kept whole
    (16 channels) than with 8, pruned or narrowed (benchmarks/fast_end.py; QNNPACK's pooling
    after it costs the same for both, benchmarks/int8_pooling.py). Keeping the first layer
    whole is a common expert rule for accuracy too. So this step is not judged by the
    outputs it removes, as the other steps for speed are: it is measured, once from each
    baseline (where it is slower, as in an MLP whose first layer feeds a wide second one,
    that is one trial)."""
    before = _shapes(space, params)
    teacher = space.task.teacher_kwargs
    first = space.layers_for(teacher)[0]
    if before is None or before.get(first.name, first.outputs) >= first.outputs:
        return None
    step, changes = params, []
    sparsity = f"{first.name}.sparsity"
    if params.get(sparsity, 0.0) > 0:
        if _pruning(params, sparsity) != "structured":
            return None
        step = _neighbour(space, step, sparsity, 0.0)
        changes.append(f"{sparsity} {params[sparsity]} -> 0.0")
    for knob in space.student_choices:  # a knob that narrowed it, back at the teacher's
        name, kept = f"student.{knob}", _shapes(space, step) or {}
        if kept.get(first.name, 0) >= first.outputs:
            break
        if name in step and step[name] != teacher.get(knob):
            moved = _neighbour(space, step, name, teacher[knob])
            wider = _shapes(space, moved) if moved is not None else None
            if wider is not None and wider.get(first.name, 0) > kept.get(first.name, 0):
                step = moved
                changes.append(f"{name} {params[name]} -> {teacher[knob]}")
    after = _shapes(space, step) if changes else None
    if after is None or after.get(first.name, 0) < first.outputs or any(
            after.get(layer) != outputs for layer, outputs in before.items()
            if layer != first.name):
        return None
    return step, ", ".join(changes)


def _can_save(space: SearchSpace, params: dict[str, Any], name: str, value: Any,
              gap_bytes: float) -> bool:
    """Whether the step of parameter ``name`` to ``value`` may save ``gap_bytes``: for a step
    of bits down, the weights of its layer (or group) that structured pruning keeps, at most
    (as many of their outputs as it keeps; their inputs may be fewer), times the bits it
    saves. A step to fewer bits of a small layer cannot make up for a larger one kept whole,
    and a trial that took it would still be larger than the baseline. Other steps: True."""
    if not name.endswith(".bits") or not isinstance(value, int) or value >= params[name]:
        return True
    try:
        recipe = space.suggest(optuna.trial.FixedTrial(params))
    except ValueError:
        return True
    kept = _shapes(space, params) or {}
    key = name.removesuffix(".bits")
    members = [n for n, g in space.groups.items() if g == key] or [key]
    weights = sum(info.weights * kept.get(info.name, info.outputs) / max(info.outputs, 1)
                  for info in space.layers_for(recipe.student) if info.name in members)
    return weights * (params[name] - value) / 8 >= gap_bytes


#: How far short of a baseline (a share of its figure) a trial may be in the one objective
#: it does not beat it in, for a step of one layer to close the gap: a point of accuracy at
#: most (a layer's bits seldom give more), a fifth of the bytes, a twentieth of the time.
REACH = {"val_accuracy": 0.01, "size_bytes": 0.2, "latency_ms": 0.05}

#: A trial that takes at most this share of a baseline's latency may spend speed on accuracy
#: (a float layer, fewer zeros) on its way to beating it; a nearer one only bits.
SPEED_TO_SPEND = 0.5

#: For the objective a trial lacks, the direction of ``_moves`` that buys it.
SPENDING = {"val_accuracy": "more accurate", "size_bytes": "smaller", "latency_ms": "smaller"}


def _buys(short: str, name: str, value: Any, params: dict[str, Any], *, slack: float) -> bool:
    """Whether changing parameter ``name`` of ``params`` to ``value`` buys the objective
    ``short`` without giving up another: a layer's bits change its accuracy and bytes, not
    its kernels' speed on a CPU; zeros change no speed either; fewer outputs (structured, a
    narrower student) change all three. A trial that runs in ``slack`` of the baseline's
    time, at most SPEED_TO_SPEND, may also buy accuracy with speed (a float layer, fewer
    zeros, a wider student)."""
    bits = name.endswith(".bits")
    if short == "val_accuracy":
        return slack <= SPEED_TO_SPEND or (bits and value != 32)
    if short == "size_bytes":
        return bits
    return not bits and not (name.endswith(".sparsity") and _pruning(params, name) != "structured")


def _one_short(metrics: dict[str, Any], target: dict[str, Any]) -> tuple[str, float] | None:
    """(the objective, how far short as a fraction of the target's figure) when ``metrics``
    beat ``target`` in every objective but that one; None otherwise. Faster by readings that
    cannot tell (``run.undecided``) is as fast: short in latency by nothing."""
    better = better_in(metrics, target)
    if len(better) == len(OBJECTIVES) and undecided(metrics, target):
        return "latency_ms", 0.0
    short = [(key, direction) for key, direction in OBJECTIVES if key not in better]
    if len(short) != 1:
        return None
    key, direction = short[0]
    gap = (target[key] - metrics[key]) if direction == "maximize" else (metrics[key] - target[key])
    return key, gap / abs(target[key]) if target[key] else gap


def _rounded_away(space: SearchSpace, name: str, before: dict[str, Any],
                  after: dict[str, Any]) -> bool:
    """Whether the step from trial parameters ``before`` to ``after`` (parameter ``name``
    changed) is one of structured pruning that the channel multiple rounds away: every layer
    keeps as many outputs, so it is the same model again (more sparsity) or one with fewer
    zeros (the method made structured). A step of zeros (unstructured) changes the model
    without changing a shape."""
    what = name.rpartition(".")[2]
    structured = (what == "sparsity" and _pruning(after, name) == "structured") or (
        what.startswith("pruning") and after[name] == "structured")
    return structured and _same_shapes(space, before, after)


def _same_shapes(space: SearchSpace, before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether the recipes of trial parameters ``before`` and ``after`` keep as many outputs
    of every layer: structured pruning keeps a multiple of ``space.channel_multiple`` (75% of
    16 channels kept in eights is 50% of them), whatever the student they start from."""
    old, new = _shapes(space, before), _shapes(space, after)
    return old is not None and old == new


def _shapes(space: SearchSpace, params: dict[str, Any]) -> dict[str, int] | None:
    """How many outputs each compressible layer of the recipe of ``params`` keeps; None when
    ``params`` make no recipe (a parameter missing)."""
    try:
        recipe = space.suggest(optuna.trial.FixedTrial(params))
    except ValueError:
        return None
    round_to = space.config.channel_multiple
    kept = {}
    for info in space.layers_for(recipe.student):
        layer, outputs = recipe.layers[info.name], info.outputs
        pruned = layer.pruning == "structured" and layer.sparsity > 0
        # never more than it has: pruning leaves a layer narrower than the multiple alone
        kept[info.name] = min(outputs, kept_channels(outputs, layer.sparsity, round_to)) \
            if pruned else outputs
    return kept


def _neighbour(space: SearchSpace, params: dict[str, Any], name: str, value: Any
               ) -> dict[str, Any] | None:
    """Trial parameters ``params`` with parameter ``name`` set to ``value``, and what that
    brings along; None when it brings a choice only the sampler makes. An unpruned layer
    has no pruning method. A student knob keeps every layer's choices; a teacher-shaped
    student that becomes narrower starts from the teacher's weights (``student.init``
    "slice") where the space allows it."""
    if name.endswith(".sparsity") and value == 0:
        key = name.removesuffix(".sparsity")
        return {k: v for k, v in dict(params, **{name: value}).items()
                if not k.startswith(f"{key}.pruning")}
    if not name.startswith("student."):
        return dict(params, **{name: value})
    try:
        recipe = space.suggest(optuna.trial.FixedTrial(params))
    except ValueError:
        return None
    student = dict(recipe.student, **{name.removeprefix("student."): value})
    names = [info.name for info in space.layers_for(student)]
    if any(n not in recipe.layers for n in names):  # a layer with no choices yet
        return None
    # a teacher-shaped recipe already says "slice" where the space allows it (space.suggest)
    moved = replace(recipe, student=student, layers={n: recipe.layers[n] for n in names})
    if not space.contains(moved):
        return None
    try:
        return space.params_of(moved)
    except ValueError:
        return None


def _pruning(params: dict[str, Any], sparsity: str) -> Any:
    """The pruning method of the layer whose sparsity parameter is ``sparsity``."""
    key = sparsity.removesuffix(".sparsity")
    return next((v for k, v in params.items() if k.startswith(f"{key}.pruning")), None)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether trial parameters ``b`` already hold the recipe of ``a`` (a conditional
    parameter ``a`` lacks, e.g. the pruning method of a layer it now prunes, may be any)."""
    return all(b.get(k) == v for k, v in a.items())


def _moves(params: dict[str, Any], space: SearchSpace, sensitivity: dict[str, Any] | None,
           toward: str) -> list[tuple[float, str, Any]]:
    """(rank, parameter, new value) of every one-step change of a layer's bits, sparsity or
    pruning method ``toward`` "smaller" or "more accurate"; the lower the rank, the sooner
    it is tried: the accuracy the sensitivity pre-pass says the change costs (smaller) or
    gives back (more accurate, negated). A student knob moves too (``_student_move``)."""
    config = space.config
    bits = sorted(config.bits)
    sparsities = sorted(config.sparsity)
    moves: list[tuple[float, str, Any]] = []
    for name, value in params.items():
        key, _, what = name.rpartition(".")
        if key == "student" and what in space.student_choices:
            if (move := _student_move(params, space, sensitivity, what, toward)) is not None:
                moves.append(move)
            continue
        if not key or key.startswith(("student", "distillation")):
            continue
        drops = _drops(key, space, sensitivity)
        if what == "bits" and value in bits:
            i = bits.index(value)
            if toward == "smaller" and i > 0:
                moves.append((drops("bits", bits[i - 1]), name, bits[i - 1]))
            if toward == "more accurate" and i + 1 < len(bits):
                moves.append((-drops("bits", value), name, bits[i + 1]))
        elif what == "sparsity" and value in sparsities:
            i = sparsities.index(value)
            if toward == "smaller" and i + 1 < len(sparsities):
                moves.append((drops("sparsity", sparsities[i + 1]), name, sparsities[i + 1]))
            if toward == "more accurate" and i > 0:
                moves.append((-drops("sparsity", value), name, sparsities[i - 1]))
        elif what.startswith("pruning") and toward == "smaller" and value != "structured":
            # a structured layer loses whole outputs: smaller matrices, faster calls
            choices = _choices(name, config.pruning)
            if "structured" in choices:
                moves.append((drops("sparsity", params.get(f"{key}.sparsity", 0.0)), name,
                              "structured"))
    return moves


def _student_move(params: dict[str, Any], space: SearchSpace, sensitivity: dict[str, Any] | None,
                  knob: str, toward: str) -> tuple[float, str, Any] | None:
    """(rank, parameter, new value) of the nearest value of student ``knob`` that is lower
    (smaller) or higher (more accurate) and changes some layer's kept outputs; None where
    there is none, or the knob's values are not numbers. Its rank is what the sensitivity
    pre-pass says the teacher lost with the layers it narrows zeroed as much (the nearest
    sparsity measured at or above the share of outputs removed): the nearest thing it
    measured to losing whole outputs."""
    name, value = f"student.{knob}", params[f"student.{knob}"]
    choices = space.student_choices[knob]
    if not all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices):
        return None
    ladder = sorted((c for c in choices if c < value), reverse=True) if toward == "smaller" \
        else sorted(c for c in choices if c > value)
    before = _shapes(space, params)
    if before is None:
        return None
    levels = sorted(s for s in space.config.sparsity if s > 0)
    for candidate in ladder:
        moved = _neighbour(space, params, name, candidate)
        after = _shapes(space, moved) if moved is not None else None
        if after is None or after == before:
            continue
        wide, narrow = (before, after) if toward == "smaller" else (after, before)
        cost = 0.0
        for layer in set(wide) & set(narrow):
            if narrow[layer] < wide[layer] and levels:
                share = 1 - narrow[layer] / wide[layer]
                level = next((s for s in levels if s >= share), levels[-1])
                cost = max(cost, _drops(layer, space, sensitivity)("sparsity", level))
        return (cost if toward == "smaller" else -cost), name, candidate
    return None


def _choices(parameter: str, configured: tuple[str, ...]) -> tuple[str, ...]:
    """The methods a pruning parameter may take (``conv1.pruning[structured,unstructured]``
    names its own list; a plain ``.pruning`` takes the configured ones)."""
    if parameter.endswith("]"):
        return tuple(parameter[parameter.index("[") + 1:-1].split(","))
    return configured


def _drops(key: str, space: SearchSpace, sensitivity: dict[str, Any] | None):
    """``drops(kind, level)``: the accuracy (fraction) the teacher lost with the layer (or
    the group's most sensitive member) alone at that level; 0 where it was not measured."""
    members = [n for n, g in space.groups.items() if g == key] or [key]
    layers = (sensitivity or {}).get("layers", {})

    def drops(kind: str, level: Any) -> float:
        found = [layers[m][kind].get(str(level)) for m in members if m in layers]
        return max((d for d in found if d is not None), default=0.0)
    return drops
