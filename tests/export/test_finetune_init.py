"""``--init``: any checkpoint the export reads starts a fine-tune. One that names no classes
(a plain state_dict) gets a new head; one that names the data's classes keeps its own; one
that names others is refused unless ``--new-head``. CIFAR ResNet-20s at 32 px keep each run
to about a second; a learning rate of ~0 and frozen batch norms leave the weights where
``--init`` put them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_testlib import trained_like, training_checkpoint
from finetune_testlib import CLASSES, finetune, image_folder

from export.train import checkpoint

STILL = ("--lr", "1e-12", "--freeze-bn", "--val-fraction", "0.2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("init") / "photos")


def test_a_plain_state_dict_gets_a_new_head_and_a_named_one_keeps_its_own(
    folder: Path, tmp_path: Path
) -> None:
    model = trained_like("cifar-resnet20", seed=5)
    plain = tmp_path / "plain.pt"  # a wrapper's layout: under state_dict, keys prefixed
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, plain)
    first = tmp_path / "first"
    assert finetune("cifar-resnet20", folder, first, "--init", str(plain), *STILL) == 0

    ckpt = checkpoint.load(first / "best.pt")
    assert ckpt.classes == CLASSES and ckpt.state_dict["fc.weight"].shape == (3, 64)
    backbone = [k for k in model.state_dict() if not k.startswith("fc.")]
    assert len(backbone) > 100
    for key in backbone:
        want = model.state_dict()[key]
        torch.testing.assert_close(ckpt.state_dict[key], want, rtol=0, atol=1e-9, msg=key)

    again = tmp_path / "again"
    assert finetune("cifar-resnet20", folder, again, "--init", str(first / "best.pt"), *STILL) == 0
    kept = checkpoint.load(again / "best.pt").state_dict
    for key in ("fc.weight", "fc.bias"):
        torch.testing.assert_close(kept[key], ckpt.state_dict[key], rtol=0, atol=1e-9, msg=key)


def test_a_checkpoint_of_other_classes_needs_new_head(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pt"
    checkpoint.save(
        training_checkpoint(trained_like("cifar-resnet20", seed=6), "cifar-resnet20"), other
    )
    capsys.readouterr()
    assert finetune("cifar-resnet20", folder, tmp_path / "a", "--init", str(other), *STILL) == 2
    assert capsys.readouterr().err == (
        f"error: --init: {other} classifies ['cat', 'dog', 'ship', 'plane', 'car', 'bird',"
        " 'deer', 'frog', 'horse', 'truck'], but the data's classes are ['bird', 'cat',"
        " 'dog']; give --new-head to replace its classifier with one for these\n"
    )
    assert not (tmp_path / "a").exists()

    run = tmp_path / "b"
    assert finetune("cifar-resnet20", folder, run, "--init", str(other), "--new-head", *STILL) == 0
    assert checkpoint.load(run / "best.pt").state_dict["fc.weight"].shape == (3, 64)

    assert finetune("cifar-resnet32", folder, tmp_path / "c", "--init", str(other)) == 2
    assert capsys.readouterr().err == (
        f"error: --init: {other} was trained as cifar-resnet20, not cifar-resnet32\n"
    )
