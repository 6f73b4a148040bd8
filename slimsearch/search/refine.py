"""Search around the best: a Pareto trial with one layer's choice changed.

A sampler proposes whole recipes; near a good one it is slow, since every proposal changes
every layer at once. An expert's next step from a good point is one layer at a time: fewer
bits or more sparsity where the layer tolerates it (smaller, faster), more bits or less
sparsity where it hurts most (more accurate), structured pruning where it was unstructured
(faster). ``propose`` picks a trial of the current front and such a change, guided by the
sensitivity pre-pass (``search.sensitivity``), and returns the Optuna parameters of the
neighbour, or None when every neighbour of the front was tried already. ``search.refine`` is
the share of trials, after the first ``START_AFTER`` completed ones, that run one.

The neighbour is a parameter change, not a recipe edit: a group of layers (space.groups)
changes together, and a choice that brings a new conditional parameter along (a pruning
method once sparsity becomes positive) is left to the sampler.
"""

from __future__ import annotations

import random
from typing import Any

import optuna
from optuna.trial import TrialState

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
    front = list(study.best_trials)  # feasible trials only, when there are constraints
    rng.shuffle(front)
    directions = ["smaller", "more accurate"]
    rng.shuffle(directions)  # the other direction only when the first has no untried move
    for trial, toward in ((t, d) for d in directions for t in front):
        moves = sorted(_moves(trial.params, space, sensitivity, toward), key=lambda m: m[0])
        for _, name, value in moves:
            params = dict(trial.params, **{name: value})
            if name.endswith(".sparsity") and value == 0:  # unpruned: no method to choose
                key = name.removesuffix(".sparsity")
                params = {k: v for k, v in params.items() if not k.startswith(f"{key}.pruning")}
            if not any(_same(params, other) for other in tried):
                return params, f"trial {trial.number}: {name} {trial.params[name]} -> {value}"
    return None


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether trial parameters ``b`` already hold the recipe of ``a`` (a conditional
    parameter ``a`` lacks, e.g. the pruning method of a layer it now prunes, may be any)."""
    return all(b.get(k) == v for k, v in a.items())


def _moves(params: dict[str, Any], space: SearchSpace, sensitivity: dict[str, Any] | None,
           toward: str) -> list[tuple[float, str, Any]]:
    """(rank, parameter, new value) of every one-step change of a layer's bits, sparsity or
    pruning method ``toward`` "smaller" or "more accurate"; the lower the rank, the sooner
    it is tried: the accuracy the sensitivity pre-pass says the change costs (smaller) or
    gives back (more accurate, negated)."""
    config = space.config
    bits = sorted(config.bits)
    sparsities = sorted(config.sparsity)
    moves: list[tuple[float, str, Any]] = []
    for name, value in params.items():
        key, _, what = name.rpartition(".")
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
