"""A built-in regression task on scikit-learn's bundled diabetes data (nothing is downloaded).

``diabetes-mlp``: 442 patients, 10 standardised features, the disease progression a year
later as the target, standardised on the training split (so the mean squared error is in
units of its variance: 1.0 is predicting the mean). An MLP 10-128-128-1 learns it to an MSE of
about 0.5 on held-out patients; the search's objective is ``neg_mean_squared_error``.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import nn

from slimsearch.tasks._base import Task, model_factory
from slimsearch.tasks.data import Split
from slimsearch.tasks.digits import DigitsMLP


@model_factory
def diabetes_mlp(*, width: float = 1.0, depth: int = 2) -> nn.Module:
    """MLP 10-128-128-1 at ``width=1, depth=2``; narrower or shallower students otherwise."""
    return DigitsMLP(width=width, depth=depth, hidden=128, in_features=10, num_classes=1)


def make_diabetes_mlp_task(seed: int = 0) -> Task:
    """Regression: diabetes progression from 10 features (265 train / 88 val / 89 test)."""
    data = load_diabetes()
    x_train, x_rest, y_train, y_rest = train_test_split(data.data, data.target, test_size=0.4,
                                                        random_state=seed)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5,
                                                    random_state=seed)
    # standardised with the training split's statistics only
    x_mean, x_std = x_train.mean(0), x_train.std(0)
    y_mean, y_std = y_train.mean(), y_train.std()

    def to_split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(torch.as_tensor((x - x_mean) / x_std, dtype=torch.float32),
                     torch.as_tensor((y - y_mean) / y_std, dtype=torch.float32))

    return Task(name="diabetes-mlp", make_model=diabetes_mlp,
                teacher_kwargs={"width": 1.0, "depth": 2},
                student_choices={"width": (0.25, 0.5, 0.75, 1.0), "depth": (1, 2)},
                train=to_split(x_train, y_train), val=to_split(x_val, y_val),
                test=to_split(x_test, y_test), metrics=("neg_mean_squared_error", "r2"),
                description="sklearn diabetes, 10 features; MLP 10-128-128-1 regression")
