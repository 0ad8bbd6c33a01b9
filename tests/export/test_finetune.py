"""``python -m export.finetune``: torchvision, timm and transformers ResNets fine-tuned for a
step or two on real JPEGs, exported by ``python -m export`` with the labels and
preprocessing the run used, and answering in ONNX Runtime what PyTorch answers."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from finetune_testlib import CLASSES, card_of, finetune, image_folder, served
from hub_folders import IMAGENET_MEAN, IMAGENET_STD, photos, timm_folder, transformers_folder
from safetensors.torch import load_file
from torchvision.models import resnet18

from export.__main__ import main as export_main
from export.finetune import folders, images
from export.train import checkpoint, reports
from service.metadata import Preprocessing

TIMM_DATA = {"input_size": (3, 64, 64), "crop_pct": 0.95}
HF_PROCESSOR = {
    "size": {"shortest_edge": 64},
    "crop_pct": 0.875,
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
}


def export(source: Path | str, ckpt: Path, out: Path, *extra: str) -> Path:
    """``python -m export SOURCE --checkpoint CKPT``, no card flags: the exported file."""
    argv = [str(source), "--checkpoint", str(ckpt), "--out", str(out), "--name", "m", *extra]
    assert export_main(argv) == 0
    return out / "m" / "1" / "model.onnx"


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "resnet10t"
    timm_folder(folder, "resnet10t", seed=3, num_classes=5, data_config=TIMM_DATA)
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "resnet-tiny"
    transformers_folder(folder, seed=4, labels=["red", "green", "blue"], processor=HF_PROCESSOR)
    return folder


def test_torchvision_resnet_exports_with_its_labels_and_preprocessing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """resnet18 at 48 px: labels are the sorted folder names, non-images are skipped and
    counted, and the export needs no card flags; ONNX Runtime then scores the validation
    images exactly as the run did, with PyTorch's logits."""
    train = image_folder(tmp_path / "train", take=slice(0, 4))
    val = image_folder(tmp_path / "val", take=slice(4, 5))
    (train / "cat" / "notes.txt").write_text("not an image")
    (train / "dog" / "broken.jpg").write_text("not a JPEG either")
    whole = (train / "bird" / "0008.jpg").read_bytes()
    (train / "bird" / "truncated.jpg").write_bytes(whole[:700])  # its header reads, its data not
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="export")
    assert finetune("resnet18", train, run, "--val-data", str(val), "--input-size", "48") == 0

    messages = [r.getMessage() for r in caplog.records]
    assert f"--data {train}: skipped 2 file(s) that are not images in a class folder:" \
        " cat/notes.txt, dog/broken.jpg" in messages  # fmt: skip
    assert "epoch 1: skipped 1 image(s) whose data could not be decoded" in messages
    assert "data: 3 classes, 13 training and 3 validation images" in messages
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"] and (run / "curve.png").stat().st_size > 0
    ckpt = checkpoint.load(run / "best.pt")
    assert (ckpt.arch, ckpt.classes, ckpt.input_size) == ("resnet18", CLASSES, 48)
    # torchvision's 256/224 resize ratio at 48 px, its filter, ImageNet's statistics.
    assert (ckpt.resize, ckpt.interpolation) == (55, "bilinear")
    assert ckpt.mean == pytest.approx(IMAGENET_MEAN) and ckpt.std == pytest.approx(IMAGENET_STD)
    assert ckpt.state_dict["fc.weight"].shape == (3, 512) and ckpt.config_sha256 is None

    model = export("resnet18", run / "best.pt", tmp_path / "models", "--verify-images", str(val))
    card = card_of(model)
    assert card.labels == CLASSES
    assert (card.preprocessing.resize, card.preprocessing.crop) == (55, 48)
    assert card.preprocessing.interpolation == "bilinear"
    assert card.preprocessing.mean == ckpt.mean and card.preprocessing.std == ckpt.std
    assert card.provenance.weights == "best.pt" and card.provenance.trained is True

    files = sorted(val.glob("*/*.jpg"))
    x, logits = served(model, files)
    net = resnet18(num_classes=3).eval()
    net.load_state_dict(ckpt.state_dict)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
    targets = np.array([CLASSES.index(f.parent.name) for f in files])
    assert float((logits.argmax(1) == targets).mean()) == pytest.approx(ckpt.val_acc, abs=1e-12)


def test_timm_folder_with_adamw_and_frozen_batch_norms(timm_dir: Path, tmp_path: Path) -> None:
    """A timm Hub folder (offline): its 5-class head becomes a 3-class one; --freeze-bn keeps
    every batch norm as the folder had it while the convolutions learn; the export rebuilds
    the folder's architecture and takes its preprocessing."""
    folder = image_folder(tmp_path / "photos")
    run = tmp_path / "run"
    extra = ("--optimizer", "adamw", "--freeze-bn", "--val-fraction", "0.2")
    assert finetune(str(timm_dir), folder, run, *extra) == 0

    ckpt = checkpoint.load(run / "best.pt")
    folder = load_file(timm_dir / "model.safetensors")
    config_sha256 = hashlib.sha256((timm_dir / "config.json").read_bytes()).hexdigest()
    assert ckpt.classes == CLASSES and ckpt.config_sha256 == config_sha256
    assert (ckpt.input_size, ckpt.resize, ckpt.interpolation) == (64, 67, "bicubic")
    assert ckpt.state_dict["fc.weight"].shape == (3, 512)
    norms = [k for k in folder if k.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    norms += [k.replace("running_mean", "weight") for k in norms if "running_mean" in k]
    assert len(norms) > 20
    for key in norms:
        torch.testing.assert_close(ckpt.state_dict[key], folder[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(ckpt.state_dict["conv1.0.weight"], folder["conv1.0.weight"])

    model = export(timm_dir, run / "best.pt", tmp_path / "models")
    card = card_of(model)
    assert card.labels == CLASSES
    assert (card.preprocessing.resize, card.preprocessing.crop) == (67, 64)
    assert card.provenance.config_sha256 == config_sha256
    assert card.provenance.weights == "best.pt"
    assert (
        card.provenance.checkpoint_sha256
        == hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
    )


def test_transformers_folder_with_a_frozen_backbone_exports_from_anywhere(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A transformers folder: --backbone-lr-scale 0 trains the classifier alone; the
    checkpoint holds the library's own keys and names the classes in its head; the export
    finds the folder by its config, not its path, and refuses another config."""
    folder = image_folder(tmp_path / "photos")
    run = tmp_path / "run"
    assert finetune(str(hf_dir), folder, run, "--backbone-lr-scale", "0") == 0

    ckpt = checkpoint.load(run / "best.pt")
    folder = load_file(hf_dir / "model.safetensors")
    assert ckpt.state_dict["classifier.1.weight"].shape == (3, 128)
    learnt = [k for k in ckpt.state_dict if k.startswith("resnet.") and k.endswith(".weight")]
    assert len(learnt) > 10
    for key in learnt:  # weights only: batch norm statistics still follow the batches
        torch.testing.assert_close(ckpt.state_dict[key], folder[key], rtol=0, atol=0, msg=key)

    moved = shutil.copytree(hf_dir, tmp_path / "elsewhere")
    card = card_of(export(moved, run / "best.pt", tmp_path / "models"))
    assert card.labels == CLASSES
    assert (card.preprocessing.resize, card.preprocessing.crop) == (73, 64)
    assert card.preprocessing.crop_rounding == "floor"  # transformers' crop, as in training

    other = shutil.copytree(hf_dir, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    argv = [str(other), "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "x")]
    capsys.readouterr()
    assert export_main([*argv, "--name", "m"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: the checkpoint was fine-tuned from a Hub folder whose config.json has sha256"
        f" {hashlib.sha256((hf_dir / 'config.json').read_bytes()).hexdigest()[:12]}..., but"
        f" {other}/config.json has "
    )


def test_resume_repeats_the_run_exactly(
    hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two epochs straight, and one epoch + --resume (decoding in a worker process this
    time), end on the same weights: every crop and flip comes from (seed, epoch, image)."""
    folder = image_folder(tmp_path / "photos")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert finetune(str(hf_dir), folder, straight, "--epochs", "2") == 0

    real_plot = reports.plot_curve

    def plot_then_interrupt(rows: list[dict[str, Any]], path: Path) -> None:
        real_plot(rows, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(reports, "plot_curve", plot_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(hf_dir), folder, resumed, "--epochs", "2")
    monkeypatch.setattr(reports, "plot_curve", real_plot)
    assert checkpoint.load(resumed / "last.pt").epoch == 1

    assert (
        finetune(str(hf_dir), folder, resumed, "--epochs", "2", "--resume", "--workers", "1") == 0
    )
    a, b = checkpoint.load(straight / "last.pt"), checkpoint.load(resumed / "last.pt")
    assert a.epoch == b.epoch == 2
    for key, value in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[key], value, rtol=0, atol=0, msg=key)
    assert [r["val_acc"] for r in a.history] == [r["val_acc"] for r in b.history]


def test_train_images_are_torchvisions_random_resized_crop_and_flip(tmp_path: Path) -> None:
    """A photo through TrainImages equals torchvision's resized_crop + hflip + to_tensor +
    normalize with the same draws, bit for bit; the draws stay in RandomResizedCrop's
    ranges, differ by epoch and repeat for the same (epoch, image)."""
    import torchvision.transforms.functional as TF

    pre = Preprocessing(resize=146, crop=128, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    files = photos()[:2]
    dataset = images.TrainImages(folders.Labelled(tuple(files), (0, 1)), pre, seed=7)
    for epoch in (1, 2, 3):
        item = dataset[(epoch, 1)]
        assert item is not None
        got, target = item
        assert target == 1 and torch.equal(got, dataset[(epoch, 1)][0])  # type: ignore[index]
        decoded = dataset.decoder.decode(files[1].read_bytes())
        rng = random.Random(f"7/{epoch}/1")
        left, top, w, h = images.crop_box(decoded.width, decoded.height, rng)
        want = TF.resized_crop(decoded, top, left, h, w, [128, 128])
        if rng.random() < 0.5:
            want = TF.hflip(want)
        want = TF.normalize(TF.to_tensor(want), IMAGENET_MEAN, IMAGENET_STD)
        assert torch.equal(got, want), epoch
    assert not torch.equal(dataset[(1, 1)][0], dataset[(2, 1)][0])  # type: ignore[index]

    rng = random.Random(0)
    for _ in range(500):
        left, top, w, h = images.crop_box(400, 300, rng)
        assert 0 <= left <= 400 - w and 0 <= top <= 300 - h
        assert 0.08 * 120_000 * 0.97 <= w * h <= 120_000 and 0.74 <= w / h <= 1.35
