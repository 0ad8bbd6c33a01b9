"""``python -m export.train``: every documented flag, and exit status 2 for bad input."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_testlib import train_argv

from export.train import cli

ROOT = Path(__file__).resolve().parents[2]
FLAGS = (
    "--arch", "--data", "--out", "--epochs", "--batch-size", "--lr", "--schedule", "--momentum",
    "--weight-decay", "--val-per-class", "--seed", "--cutout", "--limit", "--threads",
    "--device", "--amp", "--resume", "--init", "--teacher", "--distill-weight",
    "--distill-temperature", "--no-progress",
)  # fmt: skip


def test_help_runs_as_a_module_and_lists_every_flag() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "export.train", "--help"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m export.train [-h] [--arch ARCH] --data DATA")
    assert "Train a CIFAR ResNet with the recipe of He et al. (2015), section 4.2." in done.stdout
    for flag in FLAGS:
        assert f"  {flag}" in done.stdout, flag


def test_a_documented_command_parses_as_written() -> None:
    """The last distillation command of docs/training.md, flag for flag."""
    command = """
        --arch cifar-resnet20 --lr 0.05 --weight-decay 5e-4 --amp bf16 \\
        --cutout 16 --init models/cifar10-resnet20/1/checkpoint.pt --teacher runs/r56/best.pt \\
        --teacher runs/teacher-150.pt --teacher runs/teacher-110.pt \\
        --data ../shared/datasets/cifar10-train.tar.gz --epochs 60 --out runs/r20-kd56
    """
    args = cli.parse_args(shlex.split(command.replace("\\\n", "")))  # as a shell joins lines
    assert vars(args) == {
        "arch": "cifar-resnet20", "data": "../shared/datasets/cifar10-train.tar.gz",
        "out": Path("runs/r20-kd56"), "epochs": 60, "batch_size": 128, "lr": 0.05,
        "schedule": "onecycle", "momentum": 0.9, "weight_decay": 5e-4, "val_per_class": 500,
        "seed": 0, "cutout": 16, "limit": None, "threads": None, "device": "auto",
        "amp": "bf16", "resume": False, "init": Path("models/cifar10-resnet20/1/checkpoint.pt"),
        "teacher": [
            Path("runs/r56/best.pt"), Path("runs/teacher-150.pt"), Path("runs/teacher-110.pt")
        ],
        "distill_weight": 0.9, "distill_temperature": 4.0, "no_progress": False,
    }  # fmt: skip


def test_missing_or_malformed_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--out", "runs/x"], "the following arguments are required: --data"),
        (["--data", "d", "--out", "o", "--amp", "fp8"], "argument --amp: invalid choice"),
        (["--data", "d", "--out", "o", "--epochs", "many"], "argument --epochs: invalid int"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_device_and_amp_refused_where_unsupported(
    data_source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.resolve_device("auto") == torch.device("cpu")
    for extra, message in (
        (("--device", "cuda"), "no CUDA device"),
        (("--device", "mps"), "only cpu and cuda"),
        (("--device", "gpu0"), "--device 'gpu0'"),
        (("--amp", "fp16"), "--amp fp16 needs a CUDA device"),
    ):
        assert cli.main(train_argv(data_source, tmp_path / "x", "--epochs", "1", *extra)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before the run directory is made
