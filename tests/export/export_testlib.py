"""Helpers shared by the export tests: trained-looking models and their checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from export import cifar_resnet
from export.train import CHECKPOINT_FORMAT

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


def training_checkpoint(model: nn.Module, arch: str) -> dict[str, object]:
    """What ``python -m export.train`` writes to best.pt (see export/train.py)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "num_classes": len(TRAINED_CLASSES),
        "classes": list(TRAINED_CLASSES),
        "mean": list(TRAINED_MEAN),
        "std": list(TRAINED_STD),
        "input_size": 32,
        "epoch": 3,
        "val_acc": 0.5,
        "model": model.state_dict(),
        "history": [{"epoch": 3, "val_acc": 0.5}],
        "args": {"arch": arch, "epochs": 3},
    }
