"""Helpers for the checkpoint tests: the layouts other tools save, and the checks on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from export import checkpoint, cifar_resnet
from export.__main__ import main

ARCH = "cifar-resnet20"


class LitLike(nn.Module):
    """What a LightningModule's state_dict holds: the network under ``self.model``, plus a
    class-weighted loss whose ``weight`` buffer is saved too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = nn.CrossEntropyLoss(weight=torch.ones(10))


def loaded(path: Path) -> nn.Module:
    """A fresh ResNet-20 with the checkpoint at ``path`` applied."""
    fresh = cifar_resnet.build(ARCH)
    checkpoint.apply(fresh, checkpoint.load(path).state_dict, what=ARCH)
    return fresh.eval()


def assert_same_weights(model: nn.Module, source: nn.Module) -> None:
    got, expected = model.state_dict(), source.state_dict()
    assert got.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def lightning(state: dict[str, torch.Tensor], **extra: object) -> dict[str, object]:
    """The layout of a Lightning ``.ckpt``, with a real optimizer's and scheduler's state."""
    weights = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weights], lr=0.1, momentum=0.9)
    weights.grad = torch.full((3,), 0.5)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30)
    return {
        "epoch": 7,
        "global_step": 1400,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hyper_parameters": {"lr": 0.1, "depth": 20},
        **extra,
    }


def fail_cli(argv: list[str], capsys: pytest.CaptureFixture[str], out: Path) -> str:
    """``python -m export ARCH argv``, which must exit 2 with one line and write nothing."""
    assert main([ARCH, *argv, "--out", str(out), "--name", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert not (out / "m").exists()
    return err.rstrip("\n")
