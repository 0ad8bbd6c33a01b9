"""The training checkpoint contract: one layout on disk, one save, one load, for the
exporter, --init/--resume and --teacher alike, the shipped model's checkpoint included."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from export_testlib import TRAINED_CLASSES, trained_like, training_checkpoint

from export import cifar_resnet
from export.api import export_model
from export.errors import ExportError
from export.labels import CIFAR10_CLASSES
from export.train import checkpoint, cli
from export.train.checkpoint import FORMAT, ResumeState, Split, TrainingCheckpoint
from export.train.distill import Teachers

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "cifar10-resnet20" / "1" / "checkpoint.pt"
BEST_KEYS = [
    "format", "arch", "num_classes", "classes", "mean", "std", "input_size", "epoch", "val_acc",
    "model", "history", "args",
]  # fmt: skip


def _assert_same(a: TrainingCheckpoint, b: TrainingCheckpoint) -> None:
    for field in dataclasses.fields(TrainingCheckpoint):
        if field.name not in ("state_dict", "resume"):
            assert getattr(a, field.name) == getattr(b, field.name), field.name
    assert a.state_dict.keys() == b.state_dict.keys()
    for key, value in a.state_dict.items():
        assert torch.equal(b.state_dict[key], value), key


def test_save_then_load_round_trips_in_the_on_disk_layout(tmp_path: Path) -> None:
    """best.pt: the fixed keys in their order, classes and statistics as lists; last.pt adds
    the optimizer and scheduler (and the scaler only when there is one)."""
    model = trained_like("cifar-resnet20", seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2])
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    best = training_checkpoint(model, "cifar-resnet20")
    checkpoint.save(best, tmp_path / "best.pt")
    raw = torch.load(tmp_path / "best.pt", weights_only=True)
    assert list(raw) == BEST_KEYS
    assert raw["format"] == FORMAT and raw["num_classes"] == 10
    assert raw["classes"] == list(TRAINED_CLASSES) and isinstance(raw["mean"], list)
    _assert_same(checkpoint.load(tmp_path / "best.pt"), best)
    assert checkpoint.load(tmp_path / "best.pt").resume is None
    assert not list(tmp_path.glob("*.tmp"))

    last = dataclasses.replace(best, resume=ResumeState(opt.state_dict(), sched.state_dict()))
    checkpoint.save(last, tmp_path / "last.pt")
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert list(raw) == [*BEST_KEYS, "optimizer", "scheduler"]
    loaded = checkpoint.load(tmp_path / "last.pt")
    _assert_same(loaded, last)
    assert loaded.resume is not None and loaded.resume.scheduler == sched.state_dict()
    fresh = torch.optim.SGD(trained_like("cifar-resnet20", seed=1).parameters(), lr=0.1)
    fresh.load_state_dict(loaded.resume.optimizer)
    pairs = zip(opt.state.values(), fresh.state.values(), strict=True)
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"]) for a, b in pairs)

    scaled = dataclasses.replace(last, resume=ResumeState({}, {}, scaler={"scale": 1024.0}))
    checkpoint.save(scaled, tmp_path / "scaled.pt")
    assert torch.load(tmp_path / "scaled.pt", weights_only=True)["scaler"] == {"scale": 1024.0}


def test_the_shipped_checkpoint_reads_and_writes_back_unchanged(tmp_path: Path) -> None:
    """models/cifar10-resnet20/1/checkpoint.pt, written by the single-file train.py of old,
    loads through the contract and saves back to the same layout and values."""
    ckpt = checkpoint.load(SHIPPED)
    assert (ckpt.arch, ckpt.classes, ckpt.input_size) == ("cifar-resnet20", CIFAR10_CLASSES, 32)
    assert (ckpt.epoch, ckpt.val_acc, len(ckpt.history)) == (144, 0.8998, 144)
    assert ckpt.split == Split(seed=0, val_per_class=500, limit=None)
    assert ckpt.mean == pytest.approx((0.49138, 0.48218, 0.44671), abs=1e-5)
    assert ckpt.resume is None

    checkpoint.save(ckpt, tmp_path / "again.pt")
    before = torch.load(SHIPPED, weights_only=True)
    after = torch.load(tmp_path / "again.pt", weights_only=True)
    assert list(after) == list(before) == BEST_KEYS
    for key in BEST_KEYS:
        if key != "model":
            assert after[key] == before[key], key
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())


def test_the_shipped_checkpoint_exports(tmp_path: Path) -> None:
    result = export_model(
        "cifar-resnet20", checkpoint_path=SHIPPED, out=tmp_path, name="r20", batch_sizes=(1, 2)
    )
    ckpt = checkpoint.load(SHIPPED)
    card = result.card
    assert card.labels == CIFAR10_CLASSES
    assert (card.preprocessing.crop, card.preprocessing.resize) == (32, 32)
    assert (card.preprocessing.mean, card.preprocessing.std) == (ckpt.mean, ckpt.std)
    assert card.provenance.weights == "checkpoint.pt" and card.provenance.trained is True


def test_the_shipped_checkpoint_serves_as_init_and_teacher(
    data_source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default split (seed 0, 500 per class, no --limit) is the shipped run's, so it is
    accepted as a teacher; with a learning rate of ~0 --init's weights stay as they were."""
    run = tmp_path / "run"
    argv = [
        "--data", data_source, "--out", str(run), "--epochs", "1", "--batch-size", "32",
        "--no-progress", "--threads", "2", "--lr", "1e-12",
    ]  # fmt: skip
    assert cli.main([*argv, "--init", str(SHIPPED), "--teacher", str(SHIPPED)]) == 0
    shipped = torch.load(SHIPPED, weights_only=True)
    last = checkpoint.load(run / "last.pt")
    assert (last.args["init"], last.args["teacher"]) == (str(SHIPPED), [str(SHIPPED)])
    weights = [k for k in shipped["model"] if k.endswith(".weight")]
    assert len(weights) == 39  # 19 convolutions, 19 batch norms, the classifier
    for key in weights:
        torch.testing.assert_close(last.state_dict[key], shipped["model"][key], rtol=0, atol=1e-9)

    teacher = Teachers([SHIPPED], classes=CIFAR10_CLASSES, split=Split(0, 500, None))
    model = cifar_resnet.build("cifar-resnet20").eval()
    model.load_state_dict(shipped["model"])
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(teacher(x, 2.0), torch.softmax(model(x) / 2.0, dim=1))

    capsys.readouterr()
    assert cli.main([*argv, "--limit", "120", "--teacher", str(SHIPPED)]) == 2
    assert (
        "trained on another split ({'seed': 0, 'val_per_class': 500, 'limit': None},"
        " this run {'seed': 0, 'val_per_class': 500, 'limit': 120})"
    ) in capsys.readouterr().err

    # best.pt files carry no optimizer: --resume from one says so instead of failing later.
    shutil.copy(SHIPPED, tmp_path / "last.pt")
    assert cli.main([*argv, "--out", str(tmp_path), "--resume"]) == 2
    assert "holds no optimizer state" in capsys.readouterr().err


def test_other_files_are_refused_with_the_reason(
    data_source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = trained_like("cifar-resnet20", seed=2)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(
        ExportError, match=r"plain\.pt is not a checkpoint of python -m export\.train"
    ):
        checkpoint.load(plain)
    argv = train_argv_for(data_source, tmp_path / "run")
    assert cli.main([*argv, "--init", str(plain)]) == 2
    assert "is not a checkpoint of python -m export.train" in capsys.readouterr().err
    assert cli.main([*argv, "--init", str(tmp_path / "nope.pt")]) == 2
    assert capsys.readouterr().err == f"error: checkpoint {tmp_path / 'nope.pt'} does not exist\n"

    partial = training_checkpoint(model, "cifar-resnet20").to_dict()
    del partial["history"], partial["args"]
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ExportError, match=r"partial\.pt lacks history, args$"):
        checkpoint.load(tmp_path / "partial.pt")

    wrong = {**training_checkpoint(model, "cifar-resnet20").to_dict(), "num_classes": 100}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ExportError, match="says 100 classes but names 10"):
        checkpoint.load(tmp_path / "wrong.pt")


def train_argv_for(source: str, out: Path) -> list[str]:
    return ["--data", source, "--out", str(out), "--epochs", "1", "--no-progress"]
