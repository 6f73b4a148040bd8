"""A plug-in task: bring your own model and data (here scikit-learn's bundled breast-cancer set).

The experiment file names it as ``task = "my_tasks:make_task"``; slimsearch imports this module
from the experiment file's folder (or from your installed package) and calls
``make_task(seed=...)``, which must return a ``slimsearch.Task``.

To rebuild an exported model later, ``slimsearch.load_model`` imports the model factory again,
so keep this module importable where you load the model (install your package, or put its
folder on PYTHONPATH).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn

import slimsearch


class TabularNet(nn.Module):
    """``depth`` hidden layers of ``round(64 * width)`` units for 30 features, 2 classes."""

    def __init__(self, *, width: float, depth: int) -> None:
        super().__init__()
        size = max(1, round(64 * width))
        sizes = [30] + [size] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.head = nn.Linear(sizes[-1], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


# Every keyword argument of the factory is a student knob the search may change.
@slimsearch.model_factory
def tabular_net(*, width: float = 1.0, depth: int = 2) -> nn.Module:
    return TabularNet(width=width, depth=depth)


def make_task(seed: int) -> slimsearch.Task:
    """Breast-cancer features, standardised with train statistics; 60/20/20 stratified split."""
    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    train_idx, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=seed)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    mean, std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-6

    def split(rows) -> slimsearch.Split:
        return slimsearch.Split((x[rows] - mean) / std, y[rows])

    return slimsearch.Task(
        name="breast-cancer-mlp",
        make_model=tabular_net,
        teacher_kwargs={"width": 1.0, "depth": 2},  # the architecture of the teacher
        student_choices={"width": (0.25, 0.5, 1.0), "depth": (1, 2)},
        train=split(train_idx), val=split(val_idx), test=split(test_idx),
        # teacher=my_trained_model,  # pass your own trained model; else slimsearch trains one
    )
