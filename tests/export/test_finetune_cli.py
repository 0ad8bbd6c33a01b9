"""``python -m export.finetune``'s flags and their defaults; bad input: one ``error:`` line
on stderr, exit status 2, no traceback, and no run directory where nothing ran."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune_testlib import CLASSES, FIXTURES, finetune, image_folder

from export.finetune import cli

REPO = Path(__file__).resolve().parents[2]


def test_help_runs_as_a_module_and_defaults_follow_the_optimizer_and_device() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "export.finetune", "--help"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m export.finetune [-h] [--weights WEIGHTS]")
    assert "Fine-tune a ResNet on your own images" in done.stdout
    for flag in ("--backbone-lr-scale", "--freeze-bn", "--optimizer", "--val-data", "--resume"):
        assert f"  {flag}" in done.stdout, flag

    for optimizer, lr, decay in (("sgd", 0.01, 1e-4), ("adamw", 1e-3, 0.05)):
        args = cli.parse_args(["resnet18", "--data", "d", "--out", "o", "--optimizer", optimizer])
        assert (args.lr, args.weight_decay, args.workers, args.weights) == (lr, decay, None, None)
    args = cli.parse_args(["resnet18", "--data", "d", "--out", "o", "--weights", "none"])
    assert args.weights is None
    if not torch.cuda.is_available():  # on the CPU the training step needs every core
        assert cli.prepare(args) == (torch.device("cpu"), None) and args.workers == 0


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a refused run."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize(
    ("layout", "extra", "reason"),
    [
        ({"cat": 3}, (), "error: --data {data} holds 1 class folder(s) with images (cat): "
         "fine-tuning needs at least 2, one folder of images per class"),
        ({"cat": 3, "dog": 0, "bird": -1}, (), "error: --data {data}: class folder(s) without "
         "images: bird, dog (add images or remove the folder)"),
        ({"cat": 3, "dog": 3}, ("--val-fraction", "0"), "error: no images held out for "
         "validation from {data}: raise --val-fraction (each class needs at least 2 images) or "
         "give --val-data"),
        ({"cat": 3, "dog": 3}, ("--val-data", "{data}/cat"), "error: --val-data {data}/cat "
         "holds no class folder with images (root/<class>/<image>, the layout of --data)"),
        ({}, ("--data", "{data}/nowhere"), "error: --data {data}/nowhere is not a directory: "
         "expected an ImageFolder, one folder of images per class (root/<class>/<image>)"),
        ({"cat": 3, "dog": 3}, ("--weights", "DEFAULT", "--init", "x.pt"),
         "error: give --weights or --init, not both"),
        ({"cat": 3, "dog": 3}, ("--new-head",), "error: --new-head applies to --init only"),
        ({"cat": 3, "dog": 3}, ("--init", "{data}/missing.pt"),
         "error: checkpoint {data}/missing.pt does not exist"),
    ],
    ids=["one-class", "empty-classes", "no-validation", "val-flat", "not-a-folder",
         "weights-and-init", "new-head-alone", "missing-init"],
)  # fmt: skip
def test_bad_input_fails_with_one_line(
    layout: dict[str, int],
    extra: tuple[str, ...],
    reason: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``layout``: images per class folder (-1: a folder holding a text file only)."""
    data = tmp_path / "data"
    data.mkdir()
    for name, count in layout.items():
        (data / name).mkdir()
        if count < 0:
            (data / name / "readme.txt").write_text("no images here")
        for path in sorted((FIXTURES / "cat").glob("*.jpg"))[: max(count, 0)]:
            shutil.copy(path, data / name / f"{path.stem}.jpg")
    out = tmp_path / "run"
    argv = ["cifar-resnet20", "--data", str(data), "--out", str(out), "--workers", "0"]
    argv += [arg.format(data=data) for arg in extra]
    assert refused(argv, capsys) == reason.format(data=data)
    assert not out.exists()


def test_validation_classes_must_be_the_datas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = image_folder(tmp_path / "data", ("cat", "dog"))
    val = image_folder(tmp_path / "val", ("cat", "frog"))
    argv = ["resnet18", "--data", str(data), "--val-data", str(val), "--out", str(tmp_path)]
    assert refused(argv, capsys) == f"error: --val-data {val} has classes that --data lacks: frog"


def test_resume_needs_the_same_classes_and_a_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    three = image_folder(tmp_path / "three")
    two = image_folder(tmp_path / "two", CLASSES[:2])
    run = tmp_path / "run"
    argv = ["cifar-resnet20", "--out", str(run), "--workers", "0", "--no-progress"]
    assert refused([*argv, "--data", str(three), "--resume"], capsys) == (
        f"error: --resume: {run / 'last.pt'} does not exist"
    )
    assert finetune("cifar-resnet20", three, run, "--val-fraction", "0.2") == 0
    assert refused([*argv, "--data", str(two), "--resume"], capsys) == (
        f"error: --resume: {run / 'last.pt'} classifies ['bird', 'cat', 'dog'], but the data's"
        " classes are ['bird', 'cat']"
    )
    assert refused(["cifar-resnet32", *argv[1:], "--data", str(three), "--resume"], capsys) == (
        f"error: --resume: {run / 'last.pt'} is a cifar-resnet20, not cifar-resnet32"
    )


def test_sources_without_a_known_classifier_and_devices_this_machine_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = image_folder(tmp_path / "data")
    argv = ["--data", str(data), "--out", str(tmp_path / "run"), "--workers", "0"]
    assert refused(["tiny_models.nets:tiny_resnet", *argv], capsys) == (
        "error: tiny_models.nets:tiny_resnet: fine-tuning takes torchvision and CIFAR ResNets,"
        " timm/<name> and Hub folders; a user's factory has no classifier it knows how to"
        " replace"
    )
    if not torch.cuda.is_available():
        assert refused(["resnet18", *argv, "--amp", "fp16"], capsys) == (
            "error: --amp fp16 needs a CUDA device"
        )
        assert refused(["resnet18", *argv, "--device", "cuda"], capsys).startswith(
            "error: --device cuda: this torch build or machine has no CUDA device"
        )


def test_offline_weights_fail_with_a_clear_reason(tmp_path: Path) -> None:
    """--weights needs the network: offline (a proxy on a closed port, empty caches) the run
    stops with export's one-line reason before anything is written. Nothing is downloaded."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    closed = "http://127.0.0.1:9"
    env.update(HTTPS_PROXY=closed, https_proxy=closed, HTTP_PROXY=closed, http_proxy=closed)
    env.update(TORCH_HOME=str(tmp_path / "torch-home"), HF_HOME=str(tmp_path / "hf-home"))
    data = image_folder(tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, "-m", "export.finetune", "resnet18", "--weights", "IMAGENET1K_V1",
         "--data", str(data), "--out", str(tmp_path / "run")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(
        "error: cannot download resnet18 weights IMAGENET1K_V1 from "
        "https://download.pytorch.org/models/resnet18-f37072fd.pth ("
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".pth", ".bin", ".safetensors")]
