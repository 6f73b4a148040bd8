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
    """Stem then three stages (16, 32, 64 channels scaled by ``widths``; stride 1, 2, 2) of
    ``depths`` BasicBlocks each, global average pooling and a linear head. Stages are named
    ``stages.<stage>.<block>`` so a shallower student's blocks line up with the teacher's."""

    def __init__(self, *, widths: tuple[float, ...], depths: tuple[int, ...],
                 num_classes: int = 10) -> None:
        super().__init__()
        channels = [_scaled(c, w) for c, w in zip((16, 32, 64), widths, strict=True)]
        self.stem = nn.Conv2d(1, channels[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels[0])
        stages = []
        previous = channels[0]
        for stage, (c, depth) in enumerate(zip(channels, depths, strict=True)):
            blocks = []
            for i in range(depth):
                blocks.append(BasicBlock(previous, c, stride=2 if stage > 0 and i == 0 else 1))
                previous = c
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        for stage in self.stages:
            x = stage(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@model_factory
def digits_resnet(*, width: float = 1.0, width1: float = 1.0, width2: float = 1.0,
                  width3: float = 1.0, depth1: int = 2, depth2: int = 2, depth3: int = 2,
                  depth: int | None = None) -> nn.Module:
    """Residual CNN 16-32-64, BatchNorm everywhere; ``width`` scales every stage and
    ``width1..3`` / ``depth1..3`` each stage's channels and number of BasicBlocks
    (``depth``, when given, sets all three)."""
    depths = (depth,) * 3 if depth is not None else (depth1, depth2, depth3)
    return DigitsResNet(widths=(width * width1, width * width2, width * width3), depths=depths)


def make_digits_resnet_task(seed: int = 0) -> Task:
    """The 32x32 noisy digits with a small residual CNN (BatchNorm, projection shortcuts)."""
    x, y = make_digits_32x32(seed)
    train, val, test = _split(x, y, seed)
    widths, depths = (0.25, 0.5, 0.75, 1.0), (1, 2)
    return Task(name="digits-resnet", make_model=digits_resnet,
                teacher_kwargs={"width1": 1.0, "width2": 1.0, "width3": 1.0,
                                "depth1": 2, "depth2": 2, "depth3": 2},
                student_choices={"width1": widths, "width2": widths, "width3": widths,
                                 "depth1": depths, "depth2": depths, "depth3": depths},
                train=train, val=val, test=test,
                description="32x32 noisy digits; ResNet 16-32-64, BatchNorm, residual adds")
