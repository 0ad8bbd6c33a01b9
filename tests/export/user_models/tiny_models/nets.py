"""Small ResNet-like classifiers standing in for a user's code (not part of the project)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class TinyResNet(nn.Module):
    """Stem, two residual blocks, global pooling, a hidden linear layer and the head.

    The final ``nn.Linear`` (``head``) sees a ``hidden``-wide vector: that is the embedding.
    """

    def __init__(self, num_classes: int = 10, width: int = 24, hidden: int = 40) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.pool(self.blocks(self.stem(x))), 1)
        return self.head(torch.relu(self.neck(x)))


def tiny_resnet(num_classes: int = 10) -> TinyResNet:
    return TinyResNet(num_classes=num_classes)


class Drifting(TinyResNet):
    """Each call scales its logits by how often it has been called: eager PyTorch drifts
    away from the traced graph, which froze the count at export time."""

    def __init__(self) -> None:
        super().__init__(num_classes=3)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return super().forward(x) * self.calls


def drifting() -> Drifting:
    return Drifting()


def not_a_model() -> str:
    return "a string"
