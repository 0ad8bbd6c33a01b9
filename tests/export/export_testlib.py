"""Helpers shared by the export tests: trained-looking models, their checkpoints, and the
flags of a quick training run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from weights_testlib import perturb

from export import cifar_resnet
from export.train.checkpoint import TrainingCheckpoint

TRAINED_CLASSES = ("cat", "dog", "ship", "plane", "car", "bird", "deer", "frog", "horse", "truck")
TRAINED_MEAN = (0.49, 0.48, 0.45)
TRAINED_STD = (0.25, 0.24, 0.26)


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
