"""The training loop: a real (tiny) run on real images, exact resume, --init, mixed precision."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
import torch
from export_testlib import train_argv
from PIL import Image

from export import evaluate
from export.labels import CIFAR10_CLASSES
from export.train import cli, reports
from service.metadata import ModelCard

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_train_then_export(
    data_source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One epoch on a few hundred images writes every artefact, and the export accepts it."""
    run = tmp_path / "run"
    argv = [
        "--data", data_source, "--out", str(run), "--val-per-class", "5", "--epochs", "1",
        "--no-progress", "--threads", "2",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    for name in ("best.pt", "last.pt", "metrics.csv", "curve.png"):
        assert (run / name).stat().st_size > 0, name

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"]
    assert 0.0 <= float(rows[0]["val_acc"]) <= 1.0
    with Image.open(run / "curve.png") as im:
        assert im.format == "PNG"

    ckpt = torch.load(run / "best.pt", weights_only=True)  # must not need unpickling code
    assert ckpt["arch"] == "cifar-resnet20"
    assert tuple(ckpt["classes"]) == tuple(CIFAR10_CLASSES)
    assert ckpt["input_size"] == 32 and len(ckpt["mean"]) == len(ckpt["std"]) == 3

    models = tmp_path / "models"
    subprocess.run(
        [sys.executable, "-m", "export", "cifar-resnet20", "--checkpoint", str(run / "best.pt"),
         "--out", str(models), "--name", "smoke", "--version", "1"],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    session = ort.InferenceSession(
        str(models / "smoke" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    assert card.labels == tuple(CIFAR10_CLASSES)
    assert card.preprocessing.crop == 32
    assert card.preprocessing.mean == pytest.approx(ckpt["mean"])
    assert card.preprocessing.std == pytest.approx(ckpt["std"])
    assert card.provenance.trained is True

    # The exported file, fed the held-out images' bytes through the service's preprocessing,
    # scores exactly what PyTorch scored on them during training.
    capsys.readouterr()
    model = models / "smoke" / "1" / "model.onnx"
    argv = [str(model), "--data", data_source, "--val-per-class", "5"]
    assert evaluate.main(argv) == 0
    correct = round(ckpt["val_acc"] * 50)
    assert f"{correct}/50 = {2 * correct:.2f}% top-1" in capsys.readouterr().out


def test_resume_repeats_the_run_exactly(
    data_source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two epochs straight and one epoch + --resume end on the same weights (with
    --cutout, whose squares come from the same per-epoch generator as the crops)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = ("--epochs", "2", "--cutout", "8")
    assert cli.main(train_argv(data_source, straight, *run)) == 0

    # Interrupt a 2-epoch run right after its first epoch's checkpoint is written (the
    # curve is plotted after the checkpoints), as a Ctrl-C or a lost machine would.
    real_plot = reports.plot_curve

    def plot_then_interrupt(rows: list[dict[str, Any]], path: Path) -> None:
        real_plot(rows, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(reports, "plot_curve", plot_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cli.main(train_argv(data_source, resumed, *run))
    monkeypatch.setattr(reports, "plot_curve", real_plot)
    assert torch.load(resumed / "last.pt", weights_only=True)["epoch"] == 1

    assert cli.main(train_argv(data_source, resumed, *run, "--resume")) == 0
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]


def test_resume_without_checkpoint_fails_clearly(
    data_source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    none = tmp_path / "none"
    assert cli.main(train_argv(data_source, none, "--epochs", "1", "--resume")) == 2
    assert capsys.readouterr().err == f"error: --resume: {none / 'last.pt'} does not exist\n"


def test_init_starts_from_a_checkpoints_weights(data_source: str, tmp_path: Path) -> None:
    """--init: the earlier run's weights, a fresh schedule (a warm restart); wrong arch -> 2."""
    first, restart = tmp_path / "first", tmp_path / "restart"
    assert cli.main(train_argv(data_source, first, "--epochs", "1")) == 0
    init = first / "best.pt"
    # A learning rate of ~0 leaves the weights where --init put them (BN statistics still
    # move: they are not trained by the optimizer).
    assert (
        cli.main(
            train_argv(data_source, restart, "--epochs", "1", "--lr", "1e-12", "--init", str(init))
        )
        == 0
    )
    before = torch.load(init, weights_only=True)["model"]
    after = torch.load(restart / "last.pt", weights_only=True)
    assert after["epoch"] == 1 and len(after["history"]) == 1
    weights = [k for k in before if k.endswith(".weight")]
    assert weights
    for key in weights:
        torch.testing.assert_close(after["model"][key], before[key], rtol=0, atol=1e-9, msg=key)

    wrong = train_argv(data_source, tmp_path / "wrong", "--epochs", "1", "--init", str(init))
    assert cli.main([*wrong, "--arch", "cifar-resnet32"]) == 2


def test_bf16_autocast_trains_float32_weights(data_source: str, tmp_path: Path) -> None:
    """--amp bf16 runs the forward pass in bfloat16 (the weights move differently from a
    float32 run's), while the checkpoint keeps float32 weights the export takes as is."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert cli.main(train_argv(data_source, fp32, "--epochs", "1", "--device", "cpu")) == 0
    assert cli.main(train_argv(data_source, bf16, "--epochs", "1", "--amp", "bf16")) == 0
    a = torch.load(fp32 / "last.pt", weights_only=True)
    b = torch.load(bf16 / "last.pt", weights_only=True)
    assert b["args"]["amp"] == "bf16" and "scaler" not in b
    assert all(v.dtype == a["model"][k].dtype for k, v in b["model"].items())
    assert all(v.device.type == "cpu" for v in b["model"].values())
    moved = [k for k in a["model"] if k.endswith("conv1.weight")]
    assert moved and not torch.equal(a["model"][moved[0]], b["model"][moved[0]])
