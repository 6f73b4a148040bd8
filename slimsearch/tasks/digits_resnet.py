"""``digits-resnet``: a small residual CNN with BatchNorm on the 32x32 digits.

It exists to exercise structured pruning through what real networks have: residual adds that
tie the channels of several convolutions together, BatchNorm after every convolution, and
1x1 projection shortcuts where a stage changes width or resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.tasks._base import Task, model_factory
from slimsearch.tasks.digits import _scaled, _split, make_digits_32x32


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or 1x1 conv-BN when shapes change)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem (16 ch) then three stages of ``depth`` blocks (16, 32, 64 ch; stride 1, 2, 2),
    global average pooling and a linear head."""

    def __init__(self, *, width: float, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        channels = [_scaled(c, width) for c in (16, 32, 64)]
        self.stem = nn.Conv2d(1, channels[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels[0])
        blocks = []
        previous = channels[0]
        for stage, c in enumerate(channels):
            for i in range(depth):
                blocks.append(BasicBlock(previous, c, stride=2 if stage > 0 and i == 0 else 1))
                previous = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@model_factory
def digits_resnet(*, width: float = 1.0, depth: int = 2) -> nn.Module:
    """Residual CNN 16-32-64 with ``depth`` BasicBlocks per stage, BatchNorm everywhere."""
    return DigitsResNet(width=width, depth=depth)


def make_digits_resnet_task(seed: int = 0) -> Task:
    """The 32x32 noisy digits with a small residual CNN (BatchNorm, projection shortcuts)."""
    x, y = make_digits_32x32(seed)
    train, val, test = _split(x, y, seed)
    return Task(name="digits-resnet", make_model=digits_resnet,
                teacher_kwargs={"width": 1.0, "depth": 2},
                student_choices={"width": (0.25, 0.5, 0.75, 1.0), "depth": (1, 2)},
                train=train, val=val, test=test,
                description="32x32 noisy digits; ResNet 16-32-64, BatchNorm, residual adds")
