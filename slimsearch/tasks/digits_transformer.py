"""Built-in ``digits-transformer``: a transformer encoder classifier on scikit-learn's digits.

Each 8x8 digit is read as a sequence of 8 tokens (its rows) of 8 features. The teacher is
what a user would write with PyTorch's own blocks: a Linear token embedding, a learned
position embedding, ``nn.TransformerEncoder`` (2 layers of ``nn.TransformerEncoderLayer``,
model width 64, 4 heads, feed-forward 128, post-norm), mean pooling and a Linear head;
about 68k parameters. Its attention is ``nn.MultiheadAttention`` with packed q/k/v weights,
which slimsearch compresses through ``tasks.attention``.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from slimsearch.tasks._base import Task, model_factory
from slimsearch.tasks.digits import _scaled, _split

TOKENS = 8
FEATURES = 8


class DigitsTransformer(nn.Module):
    """Tokens (N, 8, 8) -> Linear embedding + position -> encoder -> mean -> Linear head."""

    def __init__(self, *, width: int, heads: int, depth: int, ff: int,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, width)
        self.position = nn.Parameter(torch.zeros(1, TOKENS, width))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position
        return self.head(self.encoder(x).mean(dim=1))


@model_factory
def digits_transformer(*, width: float = 1.0, depth: int = 2, ff_width: float = 1.0,
                       heads: int = 4) -> nn.Module:
    """Width 64, 4 heads, 2 layers, feed-forward 128 at the defaults; ``width`` scales the
    model width (a multiple of ``heads``), ``ff_width`` the feed-forward width."""
    model_width = heads * _scaled(64 // heads, width)
    return DigitsTransformer(width=model_width, heads=heads, depth=depth,
                             ff=_scaled(128, ff_width))


def make_digits_transformer_task(seed: int = 0) -> Task:
    """The digits as 8 tokens of 8 features (1078 train / 359 val / 360 test samples)."""
    digits = load_digits()
    tokens = digits.images.astype(np.float32).reshape(-1, TOKENS, FEATURES) / 16.0
    train, val, test = _split(tokens, digits.target, seed)
    return Task(name="digits-transformer", make_model=digits_transformer,
                teacher_kwargs={"width": 1.0, "depth": 2, "ff_width": 1.0},
                student_choices={"width": (0.5, 1.0), "depth": (1, 2),
                                 "ff_width": (0.25, 0.5, 1.0)},
                train=train, val=val, test=test,
                description="sklearn digits as 8 tokens of 8 features; nn.TransformerEncoder "
                            "2 x (width 64, 4 heads, ff 128)")
