"""Built-in tasks on scikit-learn's bundled 8x8 digits (nothing is downloaded).

``digits-mlp`` is the quick one: 64 features, an MLP 64-256-256-10. ``digits-cnn`` is harder and
image-shaped: each digit is rescaled to 20-28 px, placed at random on a 32x32 canvas with random
contrast and Gaussian noise, and a 3-stage CNN (16-32-64 channels, fc 1024-128-10, about 156k
parameters) learns it to about 0.90 test accuracy, leaving room for compression to hurt.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from slimsearch.tasks._base import Task, model_factory
from slimsearch.tasks.data import Split


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class DigitsMLP(nn.Module):
    """``depth`` hidden Linear+ReLU layers of ``hidden * width`` units, then a 10-way head."""

    def __init__(self, *, width: float, depth: int, hidden: int, in_features: int = 64,
                 num_classes: int = 10) -> None:
        super().__init__()
        size = _scaled(hidden, width)
        sizes = [in_features] + [size] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


@model_factory
def digits_mlp(*, width: float = 1.0, depth: int = 2, hidden: int = 256) -> nn.Module:
    """MLP 64-256-256-10 at ``width=1, depth=2``; narrower or shallower students otherwise."""
    return DigitsMLP(width=width, depth=depth, hidden=hidden)


class DigitsCNN(nn.Module):
    """Three conv(3x3)+ReLU+maxpool stages on 1x32x32 inputs, then fc -> ReLU -> fc.
    ``widths`` scales each stage's channels (16, 32, 64) on its own."""

    def __init__(self, *, widths: tuple[float, float, float], fc_width: float,
                 num_classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = (_scaled(c, w) for c, w in zip((16, 32, 64), widths, strict=True))
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc1 = nn.Linear(c3 * 4 * 4, _scaled(128, fc_width))
        self.fc2 = nn.Linear(_scaled(128, fc_width), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        # flatten rather than view(-1, 1024): pruned channels change the size.
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


@model_factory
def digits_cnn(*, width: float = 1.0, width1: float = 1.0, width2: float = 1.0,
               width3: float = 1.0, fc_width: float = 1.0) -> nn.Module:
    """3-stage CNN 16-32-64 + fc 1024-128-10 at width 1. ``width`` scales every conv stage,
    ``width1..3`` one stage each (they multiply), ``fc_width`` the hidden fc layer."""
    return DigitsCNN(widths=(width * width1, width * width2, width * width3), fc_width=fc_width)


def _split(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[Split, Split, Split]:
    """Stratified 60/20/20 train/validation/test split, deterministic from ``seed``."""
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=seed)
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed)

    def to_split(a: np.ndarray, b: np.ndarray) -> Split:
        return Split(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.long))

    return to_split(x_train, y_train), to_split(x_val, y_val), to_split(x_test, y_test)


def make_digits_mlp_task(seed: int = 0) -> Task:
    """The 64-feature digits with an MLP teacher (1078 train / 359 val / 360 test samples)."""
    digits = load_digits()
    train, val, test = _split(digits.data.astype(np.float32) / 16.0, digits.target, seed)
    return Task(name="digits-mlp", make_model=digits_mlp,
                teacher_kwargs={"width": 1.0, "depth": 2},
                student_choices={"width": (0.25, 0.5, 0.75, 1.0), "depth": (1, 2)},
                train=train, val=val, test=test,
                description="sklearn digits 8x8 as 64 features; MLP 64-256-256-10")


def make_digits_32x32(seed: int, *, noise_std: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The harder image variant: N x 1 x 32 x 32 float32 images and their labels.

    Each 8x8 digit is resized (bilinear) to a random 20-28 px square, pasted at a random
    position on a black 32x32 canvas, scaled by a random contrast 0.5-1.0 and given Gaussian
    noise of ``noise_std``. Everything is drawn from one generator seeded by ``seed``.
    """
    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    canvas = np.zeros((len(images), 1, 32, 32), dtype=np.float32)
    sizes = rng.integers(20, 29, size=len(images))
    for i, size in enumerate(sizes):
        glyph = F.interpolate(images[i:i + 1], size=(int(size), int(size)), mode="bilinear",
                              align_corners=False)[0].numpy()
        top, left = rng.integers(0, 32 - size + 1, size=2)
        canvas[i, :, top:top + size, left:left + size] = glyph * rng.uniform(0.5, 1.0)
    canvas += rng.normal(0.0, noise_std, size=canvas.shape).astype(np.float32)
    return canvas, digits.target


def make_digits_cnn_task(seed: int = 0) -> Task:
    """Digits placed at random on a noisy 32x32 canvas, with a 3-stage CNN teacher."""
    x, y = make_digits_32x32(seed)
    train, val, test = _split(x, y, seed)
    stage = (0.25, 0.5, 0.75, 1.0)
    return Task(name="digits-cnn", make_model=digits_cnn,
                teacher_kwargs={"width1": 1.0, "width2": 1.0, "width3": 1.0, "fc_width": 1.0},
                student_choices={"width1": stage, "width2": stage, "width3": stage,
                                 "fc_width": (0.5, 1.0)},
                train=train, val=val, test=test,
                description="digits rescaled 20-28 px on a noisy 32x32 canvas; CNN 16-32-64 + fc")
