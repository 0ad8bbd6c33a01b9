"""Distillation: the loss, and an ensemble of teachers read from training checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_testlib import train_argv

from export import cifar_resnet
from export.labels import CIFAR10_CLASSES
from export.train import cli
from export.train.checkpoint import Split
from export.train.distill import Teachers, distillation_loss


def test_distillation_loss_mixes_labels_and_softened_teacher() -> None:
    """Weight 0 is plain cross-entropy; weight 1 is T^2 KL(teacher || student) at T, zero
    when the student already matches the teacher."""
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    t = 4.0
    soft = torch.softmax(teacher / t, dim=1)

    ce = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(distillation_loss(logits, y, soft, 0.0, t), ce)
    matched = torch.softmax(logits / t, dim=1)
    assert distillation_loss(logits, y, matched, 1.0, t).abs() < 1e-6

    student = torch.log_softmax(logits / t, dim=1)
    kl = (soft * (soft.log() - student)).sum(1).mean() * t**2
    torch.testing.assert_close(distillation_loss(logits, y, soft, 1.0, t), kl)
    torch.testing.assert_close(distillation_loss(logits, y, soft, 0.9, t), 0.1 * ce + 0.9 * kl)


def test_distil_from_an_ensemble_of_teachers(
    data_source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--teacher twice: the soft targets are the two models' averaged probabilities, the
    run trains and records its teachers, and teachers from another split or over other
    classes are refused before any training."""
    a, b, student = tmp_path / "a", tmp_path / "b", tmp_path / "student"
    assert cli.main(train_argv(data_source, a, "--epochs", "1")) == 0
    assert cli.main(train_argv(data_source, b, "--epochs", "1", "--lr", "0.05")) == 0
    teachers = [str(a / "best.pt"), str(b / "best.pt")]

    args = cli.parse_args(
        train_argv(data_source, student, "--teacher", teachers[0], "--teacher", teachers[1])
    )
    ensemble = Teachers(args.teacher, classes=CIFAR10_CLASSES, split=Split.of(vars(args)))
    x = torch.randn(4, 3, 32, 32)
    probs = []
    for path in teachers:
        state = torch.load(path, weights_only=True)
        model = cifar_resnet.build(state["arch"], num_classes=10)
        model.load_state_dict(state["model"])
        probs.append(torch.softmax(model.eval()(x) / 3.0, dim=1))
    torch.testing.assert_close(ensemble(x, 3.0), (probs[0] + probs[1]) / 2)
    assert not any(p.requires_grad for p in ensemble.parameters())

    distil = ("--epochs", "1", "--teacher", teachers[0], "--teacher", teachers[1])
    assert cli.main(train_argv(data_source, student, *distil)) == 0
    ckpt = torch.load(student / "best.pt", weights_only=True)
    assert ckpt["args"]["teacher"] == teachers
    assert ckpt["args"]["distill_weight"] == 0.9 and ckpt["args"]["distill_temperature"] == 4.0

    other_split = tmp_path / "seed1"
    assert cli.main(train_argv(data_source, other_split, "--epochs", "1", "--seed", "1")) == 0
    capsys.readouterr()
    wrong = train_argv(data_source, tmp_path / "x", "--epochs", "1", "--teacher")
    assert cli.main([*wrong, str(other_split / "best.pt")]) == 2
    assert "trained on another split ({'seed': 1, 'val_per_class': 2, 'limit': 120}," in (
        capsys.readouterr().err
    )

    relabelled = torch.load(a / "best.pt", weights_only=True)
    relabelled["classes"] = [f"c{i}" for i in range(10)]
    torch.save(relabelled, tmp_path / "relabelled.pt")
    assert cli.main([*wrong, str(tmp_path / "relabelled.pt")]) == 2
    assert "classifies ['c0'" in capsys.readouterr().err

    assert cli.main([*wrong, teachers[0], "--distill-weight", "1.5"]) == 2
    assert "--distill-weight must be in [0, 1]" in capsys.readouterr().err
