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


def _channels(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def prune_structured(model: nn.Module, fractions: dict[str, float],
                     example_input: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Remove ``fractions[name]`` of the output channels of each named layer, lowest L2 norm
    of the coupled group first. Returns per layer what happened (channels before/after, or
    why it was skipped). At least one channel always remains."""
    if not fractions:
        return {}
    modules = dict(model.named_modules())
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                  verbose=False)
    # (no torch.no_grad here: the dependency graph is traced through autograd)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    record: dict[str, dict[str, Any]] = {}
    for name, fraction in fractions.items():
        layer = modules[name]
        before = _channels(layer)
        remove = min(int(round(before * fraction)), before - 1)
        if remove <= 0:
            record[name] = {"channels_before": before, "channels_after": before,
                            "skipped": "fraction rounds to zero channels"}
            continue
        prune_fn = (tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d)
                    else tp.prune_linear_out_channels)
        scores = importance(graph.get_pruning_group(layer, prune_fn, idxs=list(range(before))))
        idxs = torch.argsort(scores)[:remove].tolist()
        group = graph.get_pruning_group(layer, prune_fn, idxs=idxs)
        if not graph.check_pruning_group(group):
            record[name] = {"channels_before": before, "channels_after": before,
                            "skipped": "the dependency graph forbids pruning these channels"}
            continue
        group.prune()
        record[name] = {"channels_before": before, "channels_after": _channels(layer)}
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
        if parametrize.is_parametrized(layer, "weight"):  # during QAT: mask the latent weight
            layer.parametrizations.weight.original.mul_(mask)
        else:
            layer.weight.mul_(mask)
