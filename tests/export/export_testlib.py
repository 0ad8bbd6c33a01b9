"""Helpers shared by the export tests: trained-looking models, their checkpoints, and the
flags of a quick training run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from export import cifar_resnet
from export.train.checkpoint import TrainingCheckpoint

TRAINED_CLASSES = ("cat", "dog", "ship", "plane", "car", "bird", "deer", "frog", "horse", "truck")
TRAINED_MEAN = (0.49, 0.48, 0.45)
TRAINED_STD = (0.25, 0.24, 0.26)


def perturb(model: nn.Module, *, seed: int) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine parameters, as training would.

    Freshly initialized batch norms are identities (mean 0, var 1, weight 1, bias 0), which
    would let an exporter that mishandles them pass a parity test.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def trained_like(arch: str, *, seed: int, num_classes: int = 10) -> cifar_resnet.CifarResNet:
    torch.manual_seed(seed)
    model = cifar_resnet.build(arch, num_classes=num_classes)
    perturb(model, seed=seed)
    return model


def training_checkpoint(model: nn.Module, arch: str) -> TrainingCheckpoint:
    """A best.pt as ``python -m export.train`` would write it (see export/train/checkpoint.py)."""
    return TrainingCheckpoint(
        arch=arch,
        classes=TRAINED_CLASSES,
        mean=TRAINED_MEAN,
        std=TRAINED_STD,
        state_dict=model.state_dict(),
        epoch=3,
        val_acc=0.5,
        history=[{"epoch": 3, "val_acc": 0.5}],
        args={"arch": arch, "epochs": 3},
        input_size=32,
    )


def train_argv(source: str, out: Path, *extra: str) -> list[str]:
    """Flags of a quick ``python -m export.train`` run: 120 images, 2 of each class held out."""
    return [
        "--data", source, "--out", str(out), "--limit", "120", "--val-per-class", "2",
        "--batch-size", "32", "--no-progress", "--threads", "2", *extra,
    ]  # fmt: skip
