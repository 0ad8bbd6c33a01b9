"""The CIFAR-10 ResNets of He et al., in the style of torchvision's ``resnet.py``.

* v1 ("Deep Residual Learning for Image Recognition", 2015, section 4.2): basic blocks,
  depth 6n+2, 16/32/64 filters on 32x32/16x16/8x8 maps. Shortcuts that change shape use
  option A (identity with stride-2 subsampling and zero-padded channels, no parameters)
  or option B (1x1 projection + batch norm).
* v2 ("Identity Mappings in Deep Residual Networks", 2016): pre-activation bottleneck
  blocks, depth 9n+2, 16/32/64 bottleneck widths expanding 4x to 64/128/256.

Every model exposes ``forward_features`` (the globally pooled vector that feeds ``fc``)
so that the exporter can emit logits and the embedding from one pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Shortcut = Literal["A", "B"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Pad the channel dimension at the end: (W_left, W_right, H_top, H_bottom, C_front, C_back).
        return F.pad(x, (0, 0, 0, 0, 0, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, ReLU after the addition (v1)."""

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, *, shortcut: Shortcut = "A"
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = ShortcutA(in_planes, planes, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv 1x1, 3x3 (strided), 1x1 x4; a projection shortcut on shape change (v2)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in the paper's full pre-activation.
        identity = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + identity


class CifarResNet(nn.Module):
    """A CIFAR ResNet: 3x3 stem with 16 filters, three stages, global pooling, ``fc``."""

    def __init__(
        self,
        *,
        version: Literal[1, 2],
        blocks_per_stage: int,
        num_classes: int = 10,
        shortcut: Shortcut = "A",
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.version = version
        self.conv1 = _conv3x3(3, 16)
        self.in_planes = 16
        make: Callable[[int, int], nn.Module]
        if version == 1:
            self.bn1: nn.Module = nn.BatchNorm2d(16)

            def make(planes: int, stride: int) -> nn.Module:
                return BasicBlock(self.in_planes, planes, stride, shortcut=shortcut)

            expansion = BasicBlock.expansion
        else:
            self.bn1 = nn.Identity()  # v2 normalizes after the last stage instead

            def make(planes: int, stride: int) -> nn.Module:
                return PreActBottleneck(self.in_planes, planes, stride)

            expansion = PreActBottleneck.expansion

        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(make(planes, stride if i == 0 else 1))
                self.in_planes = planes * expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.final_bn: nn.Module = nn.BatchNorm2d(self.in_planes) if version == 2 else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embedding_dim = self.in_planes
        self.fc = nn.Linear(self.in_planes, num_classes)
        _init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled feature vector that feeds ``fc``: [N, 64] for v1, [N, 256] for v2."""
        x = self.conv1(x)
        if self.version == 1:
            x = self.relu(self.bn1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.version == 2:
            x = self.relu(self.final_bn(x))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def _init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal initialization for convolutions, as in the paper."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)


_ARCH = re.compile(r"^cifar-(?:(?P<pre>preact-)?resnet)(?P<depth>\d+)(?P<b>-b)?$")

CIFAR_ARCHS = (
    "cifar-resnet20",
    "cifar-resnet32",
    "cifar-resnet44",
    "cifar-resnet56",
    "cifar-resnet110",
    "cifar-resnet20-b",
    "cifar-preact-resnet56",
    "cifar-preact-resnet110",
    "cifar-preact-resnet164",
)
"""Names listed in help texts. Any depth of the right form is accepted by :func:`build`."""


def is_cifar_arch(arch: str) -> bool:
    return _ARCH.match(arch) is not None


def build(arch: str, *, num_classes: int = 10) -> CifarResNet:
    """Build a CIFAR ResNet by name.

    ``cifar-resnet{6n+2}`` is v1 with option A shortcuts, ``cifar-resnet{6n+2}-b`` the same
    with option B projections, ``cifar-preact-resnet{9n+2}`` is v2 with bottlenecks.
    """
    m = _ARCH.match(arch)
    if m is None:
        raise ValueError(
            f"unknown CIFAR architecture {arch!r}; expected cifar-resnet<6n+2>[-b] "
            f"or cifar-preact-resnet<9n+2>, e.g. {', '.join(CIFAR_ARCHS)}"
        )
    depth = int(m["depth"])
    if m["pre"]:
        if m["b"]:
            raise ValueError(f"{arch!r}: option B applies to v1 only (v2 always projects)")
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"{arch!r}: a v2 (pre-activation) depth must be 9n+2, n >= 1")
        return CifarResNet(version=2, blocks_per_stage=(depth - 2) // 9, num_classes=num_classes)
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"{arch!r}: a v1 depth must be 6n+2, n >= 1 (20, 32, 44, 56, 110)")
    return CifarResNet(
        version=1,
        blocks_per_stage=(depth - 2) // 6,
        num_classes=num_classes,
        shortcut="B" if m["b"] else "A",
    )
