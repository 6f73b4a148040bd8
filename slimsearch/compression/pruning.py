"""Pruning that shrinks layers for real, and magnitude pruning with the zeros folded in.

Structured pruning removes whole output channels (neurons) and, through Torch-Pruning's
dependency graph, the matching inputs of every layer that consumes them (including BatchNorm,
residual adds and flatten), so the pruned model has smaller weight matrices, not masks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize

from slimsearch.errors import TrialError


def _channels(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def prune_structured(model: nn.Module, fractions: dict[str, float], example_input: torch.Tensor,
                     *, round_to: int = 1) -> dict[str, dict[str, Any]]:
    """Remove ``fractions[name]`` of the output channels of each named layer, lowest L2 norm
    of the coupled group first. Returns per layer what happened (channels before/after, or
    why nothing was removed). At least ``round_to`` channels always remain.

    Fractions are of each layer's channel count before any pruning, and the count kept is
    rounded to a multiple of ``round_to``. Layers tied together (by a residual add, say) share
    their channels: the group ends at the smallest count any of its layers asks for, never at
    the product of their fractions.
    """
    if not fractions:
        return {}
    if round_to < 1:
        raise ValueError(f"round_to = {round_to}: expected an integer >= 1")
    modules = dict(model.named_modules())
    original = {name: _channels(modules[name]) for name in fractions}
    # (no torch.no_grad here: the dependency graph is traced through autograd)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                  verbose=False)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    record: dict[str, dict[str, Any]] = {}
    for name, fraction in fractions.items():
        layer = modules[name]
        current = _channels(layer)
        target = max(round_to, round_to * round(original[name] * (1.0 - fraction) / round_to))
        remove = current - target
        entry: dict[str, Any] = {"channels_before": original[name], "channels_after": current}
        record[name] = entry
        if remove <= 0:
            entry["note"] = ("already at or below the target through a coupled layer"
                             if current < original[name] else "the fraction rounds to no channel")
            continue
        prune_fn = (tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d)
                    else tp.prune_linear_out_channels)
        scores = importance(graph.get_pruning_group(layer, prune_fn, idxs=list(range(current))))
        idxs = torch.argsort(scores)[:remove].tolist()
        group = graph.get_pruning_group(layer, prune_fn, idxs=idxs)
        if not graph.check_pruning_group(group):
            raise TrialError(f"layer {name!r}: the dependency graph cannot remove {remove} of its "
                             f"{current} output channels")
        group.prune()
        entry["channels_after"] = _channels(layer)
    return record


@torch.no_grad()
def magnitude_masks(layers: dict[str, nn.Module], fractions: dict[str, float]) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude ``fractions[name]`` of each layer's weights, in place.

    Returns the boolean keep-masks so fine-tuning can hold the zeros at zero."""
    masks = {}
    for name, fraction in fractions.items():
        weight = layers[name].weight
        drop = int(round(weight.numel() * fraction))
        if drop <= 0:
            continue
        threshold_idx = torch.argsort(weight.abs().reshape(-1))[:drop]
        mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
        mask[threshold_idx] = False
        masks[name] = mask.reshape(weight.shape)
        weight.mul_(masks[name])
    return masks


@torch.no_grad()
def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Multiply each masked layer's weight by its mask (after an optimiser step)."""
    for name, mask in masks.items():
        layer = layers[name]
        weight = (layer.parametrizations.weight.original  # during QAT: mask the latent weight
                  if parametrize.is_parametrized(layer, "weight") else layer.weight)
        weight.mul_(mask.to(weight.device))  # masks are made on the CPU; training may be on CUDA
