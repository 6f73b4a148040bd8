"""What the report plots beyond the trials themselves, computed as plain data.

- ``hypervolume_history``: the front's hypervolume after each trial, in a box relative to the
  teacher (accuracy drop up to ``BOX_ACCURACY_DROP``, size up to the teacher's, latency up to
  ``BOX_LATENCY`` times the teacher's), so runs of one task compare.
- ``layer_grid``: bits and sparsity of every layer of every Pareto trial, for the heatmaps;
  ``structure_grid``: what structured and vocabulary pruning kept of each (heads, channels,
  tokens).
- ``importances``: how much each searched parameter explains each objective (Optuna's
  fANOVA), per objective.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import optuna

from slimsearch.report.data import ReportData
from slimsearch.report.pareto import hypervolume, weakly_dominates
from slimsearch.run import RunFolder

BOX_ACCURACY_DROP = 0.15
BOX_LATENCY = 2.0
#: Fewer completed trials than this, and no importance is computed (it would be noise).
MIN_TRIALS_FOR_IMPORTANCE = 8


def hypervolume_history(data: ReportData) -> list[tuple[int, float]]:
    """(trial number, hypervolume of the completed trials up to it) for each completed trial,
    objectives scaled by the teacher's: (drop / 0.15, size / teacher's, latency / teacher's),
    reference point (1, 1, 2). Empty without the teacher's figures."""
    teacher = data.teacher
    if not teacher:
        return []
    # Only the non-dominated points so far are kept, and the volume is recomputed only when a
    # new point joins them: a dominated point adds nothing (thousands of trials stay quick).
    front: list[tuple[float, float, float]] = []
    history, volume = [], 0.0
    for t in sorted(data.completed, key=lambda t: t.number):
        m = t.metrics
        drop = max(0.0, teacher["val_accuracy"] - m["val_accuracy"])
        point = (drop / BOX_ACCURACY_DROP, m["size_bytes"] / teacher["size_bytes"],
                 m["latency_ms"] / teacher["latency_ms"])
        if not any(weakly_dominates(q, point) for q in front):
            front = [q for q in front if not weakly_dominates(point, q)] + [point]
            volume = hypervolume(front, (1.0, 1.0, BOX_LATENCY))
        history.append((t.number, volume))
    return history


def layer_grid(data: ReportData) -> tuple[list[str], list[str], list[list[Any]], list[list[Any]]]:
    """(row labels, layer names, bits[row][layer], sparsity[row][layer]) for the Pareto trials,
    best validation accuracy first; None where a trial's student lacks the layer."""
    trials = [t for t in data.pareto if t.recipe]
    layers: list[str] = []
    for t in trials:
        layers += [n for n in t.recipe["layers"] if n not in layers]
    rows, bits, sparsity = [], [], []
    for t in trials:
        student = ", ".join(f"{k}={v}" for k, v in t.recipe["student"].items())
        if t.recipe.get("vocabulary", "all") != "all":
            student += f", {t.recipe['vocabulary']} vocabulary"
        if t.recipe.get("embedding_bits", 32) != 32:
            student += f", embeddings {t.recipe['embedding_bits']} bits"
        rows.append(f"trial {t.number} ({student})")
        recipe_layers = t.recipe["layers"]
        bits.append([recipe_layers[n]["bits"] if n in recipe_layers else None for n in layers])
        sparsity.append([recipe_layers[n]["sparsity"] if n in recipe_layers else None
                         for n in layers])
    return rows, layers, bits, sparsity


def structure_grid(data: ReportData) -> tuple[list[str], list[list[Any]], list[list[str]]]:
    """(columns, kept[row][column], text[row][column]) for the rows of ``layer_grid``, whose
    layers are the first columns: the fraction of each layer's outputs that
    structured pruning kept (1.0: all; None where the student lacks the layer), and its text
    ("6/12 heads" for attention, "768/1536" otherwise, "" when nothing went), read from each
    Pareto trial's ``build.json``; a token table whose vocabulary was pruned is a column of
    its own. Empty lists when no trial pruned anything structurally or its record is gone."""
    rows, layers, _, _ = layer_grid(data)
    trials = [t for t in data.pareto if t.recipe]
    records = []
    for t in trials:
        path = RunFolder(data.run_dir).trial(t.number) / "build.json"
        stages = json.loads(path.read_text()).get("stages", {}) if path.is_file() else {}
        records.append((t, (stages.get("prune") or {}).get("structured") or {},
                        (stages.get("student") or {}).get("vocabulary") or {}))
    tables = sorted({name for _, _, vocabulary in records for name in vocabulary})
    if not any(pruned or vocabulary for _, pruned, vocabulary in records):
        return [], [], []
    columns = layers + tables
    kept, text = [], []
    for t, pruned, vocabulary in records:
        row, labels = [], []
        for name in columns:
            if name in vocabulary:
                entry = vocabulary[name]
                row.append(entry["tokens"] / entry["of"])
                labels.append(f"{entry['tokens']:,}/{entry['of']:,} tokens")
            elif name in tables:  # this trial kept the whole vocabulary
                row.append(1.0)
                labels.append("")
            elif name not in t.recipe["layers"]:
                row.append(None)
                labels.append("")
            elif (entry := pruned.get(name)) and entry["channels_after"] < entry["channels_before"]:
                row.append(entry["channels_after"] / entry["channels_before"])
                labels.append(f"{entry['heads_after']}/{entry['heads_before']} heads"
                              if "heads_after" in entry
                              else f"{entry['channels_after']}/{entry['channels_before']}")
            else:
                row.append(1.0)
                labels.append("")
        kept.append(row)
        text.append(labels)
    return columns, kept, text


def importances(study: optuna.Study, objectives: list[str]) -> dict[str, dict[str, float]]:
    """Objective name -> {parameter: importance (fractions summing to 1)}, from the completed
    trials (fANOVA over the parameters all of them share); {} with too few trials."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    found = {}
    for index, name in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found[name] = {p: float(v) for p, v in optuna.importance.get_param_importances(
                    study, target=lambda t, i=index: t.values[i],
                    evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)).items()}
        except (RuntimeError, ValueError):  # e.g. no parameter every trial shares
            continue
    return found
