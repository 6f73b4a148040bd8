"""How much each layer of the teacher matters, measured once per run before the first trial.

For every compressible layer alone and every level the space allows, the teacher's validation
accuracy is measured with only that layer's weights rounded to that many bits, or only that
layer's smallest weights zeroed to that sparsity (magnitude, unstructured), with no
fine-tuning. It costs (layers x levels) accuracy passes over at most ``MAX_SAMPLES``
validation samples, a second or two for the digits tasks; where that would take longer than
``BUDGET_SECONDS`` (a pretrained transformer), over as many of the first samples as fit in it.

The result steers the search and is never reported as a trial's figure: it enqueues a few
starting recipes (the teacher's shape, each layer at the fewest bits and the most sparsity it
tolerates alone within a tolerance) and the report shows it. It is kept in the run folder
(``sensitivity.json``), written after every layer, so a killed run resumes where it stopped
and a resumed run reuses it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.atomic import read_json, write_json
from slimsearch.compression import dequantize, quantize_per_channel
from slimsearch.spaces import COMPRESSIBLE, LayerRecipe, Recipe, SearchSpace
from slimsearch.tasks import Data, Task
from slimsearch.tasks.attention import unpack_attention
from slimsearch.tasks.data import take
from slimsearch.training import full_fp32, predict, score

#: Validation samples used per accuracy pass (the first ones of the split).
MAX_SAMPLES = 1024
#: Fewer samples where all the passes over MAX_SAMPLES would take longer than this (seconds),
#: but never fewer than MIN_SAMPLES.
BUDGET_SECONDS = 240.0
MIN_SAMPLES = 64
#: One starting recipe per tolerance: the accuracy (fraction) a layer may lose alone.
START_TOLERANCES = (0.005, 0.02, 0.05)


def measure_sensitivity(teacher: nn.Module, task: Task, space: SearchSpace, *, path: Path,
                        device: torch.device,
                        say: Callable[[str], None] = print) -> dict[str, Any]:
    """``{"teacher_accuracy", "samples", "layers": {name: {"bits": {b: drop}, "sparsity":
    {s: drop}}}}``, drops as fractions of accuracy (negative: the layer gained); read from
    ``path`` where it was measured before, in part or in full."""
    config = space.config
    bits = sorted(b for b in config.bits if b < 32)
    sparsities = sorted(s for s in config.sparsity if s > 0)
    symmetric = config.weight_scheme[0] == "symmetric"
    inputs, targets = task.data("val").head(MAX_SAMPLES)
    model = copy.deepcopy(teacher).to(device).eval()
    unpack_attention(model)  # the layers students have (tasks.attention)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE)}
    levels = {"bits": bits, "sparsity": sparsities, "symmetric": symmetric}
    result: dict[str, Any] = read_json(path) if path.exists() else {}
    before = result.get("levels", {})
    if {k: before.get(k) for k in levels} == levels and "samples" in before:
        samples = before["samples"]  # resumed: the same samples as the layers measured so far
    else:  # another space (or nothing yet): start over
        passes = len(layers) * (len(bits) + len(sparsities))
        samples = _affordable_samples(model, task, inputs, targets, passes, device, say)
        result = {"levels": {**levels, "samples": samples}, "layers": {}}
    inputs, targets = take(inputs, slice(0, samples)), targets[:samples]
    # read once, evaluated again for every change, 512 samples at a time as before
    data = Data("val", [(take(inputs, slice(i, i + 512)), targets[i:i + 512])
                        for i in range(0, len(targets), 512)])
    with full_fp32():
        base_outputs, _ = predict(model, data, device=device)
    base = task.metric.score(base_outputs, targets)
    result["teacher_accuracy"] = base
    todo = [n for n in layers if n not in result["layers"]]
    if todo:
        say(f"sensitivity pre-pass: {len(todo)} layers x {len(bits) + len(sparsities)} levels "
            f"on {len(targets)} validation samples")
    for name in todo:
        weight = layers[name].weight
        original = weight.detach().clone()
        drops: dict[str, Any] = {"bits": {}, "sparsity": {}, "divergence": {}}
        changes = [("bits", b, dequantize(quantize_per_channel(original, b, symmetric=symmetric))
                    .reshape(original.shape)) for b in bits]
        for s in sparsities:
            keep = original.abs().flatten()
            threshold = keep.kthvalue(max(1, int(s * keep.numel()))).values
            changes.append(("sparsity", s, torch.where(original.abs() > threshold, original, 0.0)))
        with torch.no_grad():
            for kind, level, changed in changes:
                weight.copy_(changed)
                # A model whose forward fails with this layer changed gets the error recorded
                # (and, for a sparsity, the layer is left unpruned), not a run that ends here.
                try:
                    with full_fp32():
                        outputs, _ = predict(model, data, device=device)
                    drops[kind][str(level)] = round(base - task.metric.score(outputs, targets), 6)
                    drops["divergence"][f"{kind} {level}"] = divergence(base_outputs, outputs)
                except Exception as exc:  # the user's forward: any error is possible
                    drops.setdefault("failed", {})[f"{kind} {level}"] = \
                        f"{type(exc).__name__}: {exc}"
                    if kind == "sparsity":
                        drops["prunable"] = False
            weight.copy_(original)
        result["layers"][name] = drops
        if "failed" in drops:
            say(f"sensitivity pre-pass: layer {name} failed the model's forward when "
                f"{', '.join(drops['failed'])}: {next(iter(drops['failed'].values()))}"
                + ("; the search leaves it unpruned" if not drops.get("prunable", True) else ""))
        write_json(path, result)  # after every layer: a killed run keeps what it measured
    return result


def _affordable_samples(model: nn.Module, task: Task, inputs: Any, targets: torch.Tensor,
                        passes: int, device: torch.device, say: Callable[[str], None]) -> int:
    """How many of the validation samples the pre-pass can score ``passes`` times within
    ``BUDGET_SECONDS``, from the time of one pass on all of them (a 6-layer transformer on
    hundreds of long sequences would otherwise cost a quarter of an hour); at least
    ``MIN_SAMPLES``."""
    start = time.perf_counter()
    score(model, Data("val", [(inputs, targets)]), task.metric, device=device)
    per_sample = (time.perf_counter() - start) / len(targets)
    affordable = int(BUDGET_SECONDS / (per_sample * max(passes, 1)))
    if affordable >= len(targets):
        return len(targets)
    samples = min(len(targets), max(MIN_SAMPLES, affordable))
    say(f"sensitivity pre-pass: {passes} passes over {len(targets)} validation samples would "
        f"take about {per_sample * len(targets) * passes / 60:.0f} min; measured on the first "
        f"{samples} (a budget of {BUDGET_SECONDS / 60:.0f} min)")
    return samples


def divergence(reference: torch.Tensor, outputs: torch.Tensor) -> float:
    """How far ``outputs`` moved from ``reference`` (the teacher's, on the same samples): the
    mean KL divergence of their softmax for class scores, the mean squared difference scaled
    by the reference's variance for a regression's single output. Unlike the accuracy drop, it
    tells layers apart on a few samples, where most changes flip no prediction."""
    if reference.dim() == 2 and reference.shape[1] > 1:
        return round(float(F.kl_div(F.log_softmax(outputs.float(), dim=1),
                                    F.log_softmax(reference.float(), dim=1),
                                    reduction="batchmean", log_target=True)), 8)
    spread = float(reference.float().var()) or 1.0
    return round(float(F.mse_loss(outputs.float(), reference.float())) / spread, 8)


def not_prunable(sensitivity: dict[str, Any]) -> set[str]:
    """Layers whose model failed its forward pass with the layer pruned in the pre-pass."""
    return {name for name, drops in sensitivity["layers"].items()
            if drops.get("prunable", True) is False}


def sensitivity_groups(sensitivity: dict[str, Any], count: int) -> dict[str, str]:
    """Layer name -> ``group1`` .. ``groupN``: the layers sorted by their mean drop over
    every level (then, among equal drops, by how far the outputs moved: ``divergence``), cut
    into ``count`` runs of (nearly) equal length; group1 is the least sensitive. Students
    only ever have layers the teacher has, so every layer is placed."""
    def score(name: str) -> tuple[float, float]:
        drops = sensitivity["layers"][name]
        values = [*drops["bits"].values(), *drops["sparsity"].values()]
        moved = list(drops.get("divergence", {}).values())  # ties in accuracy: most of them
        return (sum(values) / len(values) if values else 0.0,
                sum(moved) / len(moved) if moved else 0.0)

    ordered = sorted(sensitivity["layers"], key=score)
    count = max(1, min(count, len(ordered)))
    return {name: f"group{1 + i * count // len(ordered)}" for i, name in enumerate(ordered)}


def starting_recipes(sensitivity: dict[str, Any], space: SearchSpace) -> dict[str, Recipe]:
    """Teacher-shaped recipes, one per tolerance in ``START_TOLERANCES``: every layer at the
    fewest bits and the highest (unstructured) sparsity whose drop alone is within it (in a
    grouped space, the group's most sensitive member decides). Only those the space can
    express, without repeats."""
    config = space.config
    teacher = dict(space.task.teacher_kwargs)
    infos = {i.name: i for i in space.layers_for(teacher)}
    prune = "unstructured" if "unstructured" in config.pruning else None
    recipes: dict[str, Recipe] = {}
    for tolerance in START_TOLERANCES:
        layers = {}
        for name in infos:
            drops = sensitivity["layers"].get(name, {"bits": {}, "sparsity": {}})
            ok_bits = [int(b) for b, d in drops["bits"].items() if d <= tolerance]
            ok_sparsity = [float(s) for s, d in drops["sparsity"].items() if d <= tolerance]
            sparsity = max(ok_sparsity, default=0.0) if prune and drops.get("prunable", True) \
                else 0.0
            layers[name] = LayerRecipe(sparsity=sparsity, pruning=prune or "unstructured",
                                       bits=min(ok_bits, default=max(config.bits)))
        for group in set(space.groups.values()):  # members share: the most careful choice
            members = [n for n in layers if space.groups.get(n) == group]
            bits = max(layers[n].bits for n in members)
            sparsity = min(layers[n].sparsity for n in members)
            for n in members:
                layers[n] = LayerRecipe(sparsity=sparsity, pruning=layers[n].pruning, bits=bits)
        recipe = Recipe(student=teacher, student_init="slice", layers=layers,
                        activation_bits=max(config.activations),
                        importance=config.importance[0],
                        distillation={k: c[0] for k, c in config.distillation.items()},
                        weight_scheme=config.weight_scheme[0],
                        vocabulary="all" if "all" in config.vocabulary else config.vocabulary[0],
                        embedding_bits=max(config.embedding_bits))
        if space.contains(recipe) and recipe not in recipes.values():
            recipes[f"sensitivity-{tolerance:g}"] = recipe
    return recipes
