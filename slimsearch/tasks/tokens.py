"""Where a text model reads its token ids: the input that holds them, the embedding tables
that look them up, and which ids a split uses (what vocabulary pruning keeps,
``compression.vocabulary``; checked by the search space before any training)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slimsearch.tasks.data import Data, Inputs, call_model, tensors_of


def input_tensor(inputs: Inputs, key: str | int) -> torch.Tensor:
    """The tensor ``key`` (a dict key, or a position) of a batch's inputs."""
    if isinstance(inputs, Mapping):
        if key not in inputs:
            raise KeyError(f"the inputs have no {key!r}; they hold {sorted(inputs)}")
        return inputs[key]
    return tensors_of(inputs)[int(key)]


def token_embeddings(model: nn.Module, inputs: Inputs, key: str | int) -> list[str]:
    """The ``nn.Embedding`` modules of ``model`` that look up the input ``key`` itself (the
    token table, not the position or segment tables), found by running ``inputs``."""
    ids = input_tensor(inputs, key)
    found: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                given = args[0] if args else None
                if isinstance(given, torch.Tensor) and (given is ids or (
                        given.shape == ids.shape and given.data_ptr() == ids.data_ptr())):
                    found.append(name)
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(found))


def tokens_seen(data: Data, key: str | int) -> torch.Tensor:
    """Every distinct id of the input ``key`` over one pass of ``data``, sorted."""
    seen = torch.zeros(0, dtype=torch.long)
    for inputs, _, _ in data.batches(batch_size=512):
        seen = torch.unique(torch.cat([seen, input_tensor(inputs, key).reshape(-1).long()]))
    return seen
