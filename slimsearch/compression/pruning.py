"""Pruning that shrinks layers for real, and sparsity with the zeros folded in.

Structured pruning removes whole output channels (neurons) and, through Torch-Pruning's
dependency graph, the matching inputs of every layer that consumes them (including BatchNorm,
residual adds and flatten), so the pruned model has smaller weight matrices, not masks.
Channels are ranked by one of ``IMPORTANCE``'s criteria, summed over the coupled group.

Unstructured methods (``SPARSITY_PATTERNS``) zero individual weights: ``unstructured`` by
magnitude per layer, ``global`` by one magnitude threshold across every layer that chose it,
``2:4`` the two smallest of every four consecutive input weights (the pattern GPUs'
semi-structured sparse kernels execute). Their zeros shrink the model file.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize

from slimsearch.errors import TrialError
from slimsearch.tasks.attention import ROLES, AttentionBlock, attention_blocks
from slimsearch.tasks.data import Inputs, call_model, output_tensor
from slimsearch.training import supervised_loss

#: Channel-importance criteria by name; each makes a Torch-Pruning importance object.
IMPORTANCE: dict[str, Callable[[], Any]] = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    # First-order Taylor |w * dL/dw|: needs gradients, computed on a batch of training data.
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
}


def _channels(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def kept_channels(channels: int, fraction: float, round_to: int = 1) -> int:
    """How many of a layer's ``channels`` outputs structured pruning of ``fraction`` keeps:
    a multiple of ``round_to``, at least ``round_to``."""
    return max(round_to, round_to * round(channels * (1.0 - fraction) / round_to))


def prune_structured(model: nn.Module, fractions: dict[str, float], example_input: Inputs,
                     *, round_to: int = 1, importance: str = "l2",
                     gradient_batch: tuple[Inputs, torch.Tensor] | None = None,
                     ) -> dict[str, dict[str, Any]]:
    """Remove ``fractions[name]`` of the output channels of each named layer, lowest L2 norm
    of the coupled group first. Returns per layer what happened (channels before/after, or
    why nothing was removed). At least ``round_to`` channels always remain.

    Fractions are of each layer's channel count before any pruning, and the count kept is
    rounded to a multiple of ``round_to``. Layers tied together (by a residual add, say) share
    their channels: the group ends at the smallest count any of its layers asks for, never at
    the product of their fractions. ``importance`` names a criterion of ``IMPORTANCE``;
    ``taylor`` needs ``gradient_batch`` (inputs, labels). ``bn_scale`` falls back to ``l2``
    for a group without BatchNorm (recorded).
    """
    if not fractions:
        return {}
    if round_to < 1:
        raise ValueError(f"round_to = {round_to}: expected an integer >= 1")
    if importance not in IMPORTANCE:
        raise ValueError(f"importance = {importance!r}: expected one of {sorted(IMPORTANCE)}")
    if importance == "taylor" and gradient_batch is None:
        raise ValueError("importance = 'taylor' needs a gradient_batch of (inputs, labels)")
    modules = dict(model.named_modules())
    record: dict[str, dict[str, Any]] = {}
    blocks = {block.layer_name("q"): block for block in attention_blocks(model).values()}
    if heads := {n: f for n, f in fractions.items() if n in blocks}:
        if importance == "taylor":
            _gradients(model, *gradient_batch)
        for name, fraction in heads.items():
            record[name] = prune_heads(blocks[name], fraction, importance=importance)
        fractions = {n: f for n, f in fractions.items() if n not in heads}
        if not fractions:
            return record
    original = {name: _channels(modules[name]) for name in fractions}
    # (no torch.no_grad here: the dependency graph is traced through autograd)
    try:
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input, forward_fn=call_model,
            output_transform=output_tensor, verbose=False)
    except Exception as exc:  # Torch-Pruning traces autograd; exotic ops raise many types
        raise TrialError(f"structured pruning of {sorted(fractions)} needs the model's dependency "
                         f"graph, which Torch-Pruning could not trace: {type(exc).__name__}: {exc}. "
                         "Use unstructured pruning for this model") from exc
    scorer, fallback = IMPORTANCE[importance](), IMPORTANCE["l2"]()
    for name, fraction in fractions.items():
        layer = modules[name]
        current = _channels(layer)
        target = kept_channels(original[name], fraction, round_to)
        remove = current - target
        entry: dict[str, Any] = {"channels_before": original[name], "channels_after": current}
        record[name] = entry
        if remove <= 0:
            entry["note"] = ("already at or below the target through a coupled layer"
                             if current < original[name] else "the fraction rounds to no channel")
            continue
        prune_fn = (tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d)
                    else tp.prune_linear_out_channels)
        if importance == "taylor":
            _gradients(model, *gradient_batch)  # fresh: earlier pruning changed the shapes
        try:
            whole = graph.get_pruning_group(layer, prune_fn, idxs=list(range(current)))
        except ValueError as exc:  # the layer is outside the traced graph (e.g. a .detach())
            raise TrialError(f"layer {name!r} cannot be pruned structurally: Torch-Pruning did not "
                             f"find it in the traced graph ({exc})") from exc
        scores = scorer(whole)
        if scores is None:
            scores = fallback(whole)
            entry["importance"] = f"{importance} not applicable to this group: used l2"
        idxs = torch.argsort(scores)[:remove].tolist()
        group = graph.get_pruning_group(layer, prune_fn, idxs=idxs)
        if not graph.check_pruning_group(group):
            raise TrialError(f"layer {name!r}: the dependency graph cannot remove {remove} of its "
                             f"{current} output channels")
        group.prune()
        entry["channels_after"] = _channels(layer)
    return record


@torch.no_grad()
def prune_heads(block: AttentionBlock, fraction: float, *,
                importance: str = "l2") -> dict[str, Any]:
    """Remove ``fraction`` of the heads of an attention block (``tasks.attention``'s
    convention): each removed head's rows of q, k and v and its columns of the output
    projection go together, and ``num_heads`` is lowered; at least one head remains. Heads
    are ranked by the ``importance`` criterion over those weights and biases (``l1``, ``l2``;
    ``taylor``: |weight x gradient|, the gradients already computed; ``bn_scale`` has no
    BatchNorm here and uses ``l2``, recorded). Returns what happened."""
    q, k, v, out = (block.projection(role) for role in ROLES)
    heads = block.heads
    width = q.out_features // heads
    keep_count = max(1, round(heads * (1.0 - fraction)))
    entry: dict[str, Any] = {"heads_before": heads, "heads_after": heads,
                             "channels_before": q.out_features, "channels_after": q.out_features}
    if keep_count >= heads:
        entry["note"] = "the fraction rounds to no head"
        return entry

    def per_head(tensor: torch.Tensor | None, grad: torch.Tensor | None, columns: bool) -> torch.Tensor:
        if tensor is None:
            return torch.zeros(heads)
        value = (tensor * grad).abs() if importance == "taylor" else tensor.abs()
        if importance != "taylor" and importance != "l1":
            value = value.pow(2)
        value = value.t() if columns else value
        return value.reshape(heads, -1).sum(dim=1)

    def grad_of(t: torch.Tensor | None) -> torch.Tensor | None:
        if importance != "taylor" or t is None:
            return None
        return t.grad if t.grad is not None else torch.zeros_like(t)

    scores = sum(per_head(layer.weight, grad_of(layer.weight), False)
                 + per_head(layer.bias, grad_of(layer.bias), False) for layer in (q, k, v))
    scores = scores + per_head(out.weight, grad_of(out.weight), True)
    if importance == "bn_scale":
        entry["importance"] = "bn_scale not applicable to attention heads: used l2"
    kept = sorted(torch.argsort(scores, descending=True)[:keep_count].tolist())
    rows = torch.cat([torch.arange(h * width, (h + 1) * width) for h in kept])
    for layer in (q, k, v):
        layer.weight = nn.Parameter(layer.weight[rows].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[rows].clone())
        layer.out_features = len(rows)
    out.weight = nn.Parameter(out.weight[:, rows].clone())
    out.in_features = len(rows)
    block.set_heads(keep_count, width)
    entry.update(heads_after=keep_count, channels_after=len(rows), kept_heads=kept)
    return entry


def structured_blockers(model: nn.Module, example_input: Inputs,
                        names: Sequence[str]) -> dict[str, str]:
    """Which of ``names`` structured pruning cannot shrink, and why: Torch-Pruning cannot trace
    the model, the layer is outside its graph, or the model's forward fails once a quarter of
    the layer's channels (at least one; in attention, heads) are gone (attention code that is
    not ``tasks.attention``'s convention, say). Each layer is tried alone on a copy; ``model``
    is not changed."""
    blocked: dict[str, str] = {}
    modules = dict(model.named_modules())
    heads = {block.layer_name("q"): block.heads for block in attention_blocks(model).values()}
    for name in names:
        count = heads.get(name) or _channels(modules[name])
        if count < 2:
            continue  # nothing to remove: not a blocker
        trial = copy.deepcopy(model).eval()
        try:
            prune_structured(trial, {name: max(0.25, 1.0 / count)}, example_input)
            with torch.no_grad():
                output_tensor(call_model(trial, example_input))
        except Exception as exc:  # Torch-Pruning and the user's forward raise any type
            text = str(exc).splitlines()[0] if str(exc) else ""
            blocked[name] = f"{type(exc).__name__}: {text}"[:300]
    return blocked


def _gradients(model: nn.Module, inputs: Inputs, labels: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    supervised_loss(output_tensor(call_model(model, inputs)), labels).backward()
    model.train(was_training)


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
def nm_masks(layers: dict[str, nn.Module], names: list[str], *, n: int = 2,
             m: int = 4) -> dict[str, torch.Tensor]:
    """Keep the ``n`` largest of every ``m`` consecutive input weights of each output row.

    The input size (``in_features``, or ``in_channels * kh * kw``) must be a multiple of ``m``."""
    masks = {}
    for name in names:
        weight = layers[name].weight
        rows = weight.reshape(weight.shape[0], -1)
        if rows.shape[1] % m:
            raise TrialError(f"layer {name!r}: {n}:{m} sparsity needs an input size that is a "
                             f"multiple of {m}, but it has {rows.shape[1]} inputs per output")
        groups = rows.abs().reshape(rows.shape[0], -1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(n, dim=2).indices, True)
        masks[name] = keep.reshape(weight.shape)
        weight.mul_(masks[name])
    return masks


@torch.no_grad()
def global_magnitude_masks(layers: dict[str, nn.Module],
                           fractions: dict[str, float]) -> dict[str, torch.Tensor]:
    """One magnitude threshold over all the named layers together: they lose as many weights
    in total as their fractions ask for, taken wherever the weights are smallest (so a layer
    with many small weights gives more than one whose weights matter)."""
    names = list(fractions)
    if not names:
        return {}
    sizes = [layers[n].weight.numel() for n in names]
    drop = int(round(sum(size * fractions[n] for n, size in zip(names, sizes, strict=True))))
    magnitudes = torch.cat([layers[n].weight.abs().reshape(-1) for n in names])
    keep = torch.ones(len(magnitudes), dtype=torch.bool, device=magnitudes.device)
    keep[torch.argsort(magnitudes)[:drop]] = False
    masks = {}
    for name, part in zip(names, torch.split(keep, sizes), strict=True):
        weight = layers[name].weight
        masks[name] = part.reshape(weight.shape)
        weight.mul_(masks[name])
    return masks


#: Weight-level sparsity methods by the name a recipe uses; each returns keep-masks.
SPARSITY_PATTERNS: dict[str, Callable[[dict[str, nn.Module], dict[str, float]], dict[str, torch.Tensor]]] = {
    "unstructured": magnitude_masks,
    "global": global_magnitude_masks,
    "2:4": lambda layers, fractions: nm_masks(layers, list(fractions), n=2, m=4),
}


@torch.no_grad()
def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Multiply each masked layer's weight by its mask (after an optimiser step)."""
    for name, mask in masks.items():
        layer = layers[name]
        weight = (layer.parametrizations.weight.original  # during QAT: mask the latent weight
                  if parametrize.is_parametrized(layer, "weight") else layer.weight)
        weight.mul_(mask.to(weight.device))  # masks are made on the CPU; training may be on CUDA
