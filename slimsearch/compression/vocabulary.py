"""Vocabulary pruning: keep the embedding rows of the tokens the training split uses.

A text model's token-embedding table is often half its weights (all-MiniLM-L6-v2: 30,522 x
384 of 22.7M parameters), while one task's text uses a fraction of the tokenizer's vocabulary
(BBC News: 11,582 tokens in training, as issue 19 measured it). ``prune_vocabulary``
replaces the table read by the task's token-id input (``tasks.Vocabulary``) with a
``VocabularyEmbedding``: the rows of the tokens seen in training plus the special tokens, and
a mapping from every original id to its row, where a token that was not kept reads the
unknown token's row, as the tokenizer would have given [UNK] for it. The model keeps taking
the tokenizer's own ids: the mapping travels inside the model file, so the deployed model
and the user's tokenizer stay a pair.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.tasks import Data, Vocabulary
from slimsearch.tasks.data import Inputs
from slimsearch.tasks.tokens import token_embeddings, tokens_seen


class VocabularyEmbedding(nn.Embedding):
    """An ``nn.Embedding`` holding ``num_embeddings`` kept rows of a ``vocabulary_size``-token
    vocabulary: token ``id`` reads row ``rows[id]`` (int32, one entry per original id)."""

    def __init__(self, vocabulary_size: int, num_embeddings: int, embedding_dim: int,
                 padding_idx: int | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.vocabulary_size = vocabulary_size
        self.register_buffer("rows", torch.zeros(vocabulary_size, dtype=torch.int32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.rows[ids], self.weight, self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{self.vocabulary_size} tokens -> {super().extra_repr()}"


@torch.no_grad()
def prune_vocabulary(model: nn.Module, vocabulary: Vocabulary, train: Data,
                     example: Inputs) -> dict[str, Any]:
    """Replace each embedding table that reads ``vocabulary.input`` by a
    ``VocabularyEmbedding`` of the tokens of ``train`` plus ``vocabulary.keep`` and the unknown
    token; return what was kept, by table (``{"tokens", "of"}``), for the trial's record."""
    names = token_embeddings(model, example, vocabulary.input)
    if not names:
        raise ValueError(f"no nn.Embedding of the model reads the input {vocabulary.input!r} "
                         "(the task's vocabulary.input)")
    seen = tokens_seen(train, vocabulary.input)
    kept: dict[str, Any] = {}
    for name in names:
        table = model.get_submodule(name)
        size = table.num_embeddings
        if isinstance(table, VocabularyEmbedding):
            continue
        special = torch.tensor([*vocabulary.keep, vocabulary.unknown], dtype=torch.long)
        ids = torch.unique(torch.cat([seen, special]))
        if int(ids.min()) < 0 or int(ids.max()) >= size:
            raise ValueError(f"token ids {int(ids.min())}..{int(ids.max())} do not fit the "
                             f"{size}-row table {name!r}")
        padding = table.padding_idx
        new = VocabularyEmbedding(size, len(ids), table.embedding_dim,
                                  padding_idx=None if padding is None or padding not in ids
                                  else int(torch.searchsorted(ids, padding)))
        new.weight.copy_(table.weight[ids])
        new.weight.requires_grad_(table.weight.requires_grad)
        rows = torch.full((size,), int(torch.searchsorted(ids, vocabulary.unknown)),
                          dtype=torch.int32)
        rows[ids] = torch.arange(len(ids), dtype=torch.int32)
        new.rows.copy_(rows)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        kept[name] = {"tokens": len(ids), "of": size}
    return kept
