"""Fixtures for the export tests: real JPEGs, trained-looking CIFAR models, one shared export.

Exports take seconds each on two cores, so every ONNX file here is made once per session
and read by many tests.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from export_testlib import trained_like, training_checkpoint
from PIL import Image
from torch import nn

from export.api import export_model
from export.labels import CIFAR10_CLASSES
from export.repository import ExportResult
from export.train import checkpoint

REPO = Path(__file__).resolve().parents[2]
CIFAR_TAR = REPO.parent / "shared" / "datasets" / "cifar10-train.tar.gz"
USER_MODELS = Path(__file__).resolve().parent / "user_models"


@pytest.fixture(scope="session")
def cifar_jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight real CIFAR-10 JPEGs from the shared data set, one class each."""
    if not CIFAR_TAR.exists():
        pytest.fail(f"{CIFAR_TAR} is missing: the export tests verify on its real images")
    out = tmp_path_factory.mktemp("jpegs")
    taken: dict[str, Path] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-2] in taken:
                continue
            data = tar.extractfile(member)
            if data is None:
                continue
            path = out / f"{parts[-2]}.jpg"
            path.write_bytes(data.read())
            taken[parts[-2]] = path
            if len(taken) == 8:
                break
    return out


@pytest.fixture(scope="session")
def data_source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small ImageFolder to train on: real CIFAR-10 JPEGs from the shared tarball where it
    exists, generated images (one mean colour per class, something to learn) where it does
    not. 30 per class, so the default split (500 per class) holds out 6 of each."""
    root = tmp_path_factory.mktemp("imagefolder")
    per_class = 30
    if CIFAR_TAR.exists():
        taken: dict[str, int] = {}
        with tarfile.open(CIFAR_TAR) as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                cls = path.parent.name
                if member.isfile() and path.suffix == ".jpg" and taken.get(cls, 0) < per_class:
                    taken[cls] = taken.get(cls, 0) + 1
                    (root / cls).mkdir(exist_ok=True)
                    (root / cls / path.name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
        return str(root)
    rng = np.random.default_rng(0)
    for i, name in enumerate(CIFAR10_CLASSES):
        (root / name).mkdir()
        for j in range(per_class):
            pixels = rng.normal(25 * i, 40, (32, 32, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{j:04d}.jpg", quality=75)
    return str(root)


@pytest.fixture(scope="session")
def trained_r20(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A trained-looking ResNet-20 (option A) and its training-script checkpoint file."""
    model = trained_like("cifar-resnet20", seed=20)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    checkpoint.save(training_checkpoint(model, "cifar-resnet20"), path)
    return model, path


@pytest.fixture(scope="session")
def trained_r20_export(
    trained_r20: tuple[nn.Module, Path],
    cifar_jpegs: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ExportResult:
    """``python -m export cifar-resnet20 --checkpoint best.pt --verify-images jpegs``."""
    _, ckpt = trained_r20
    out = tmp_path_factory.mktemp("models")
    return export_model(
        "cifar-resnet20",
        checkpoint_path=ckpt,
        out=out,
        name="cifar10-resnet20",
        verify_images=cifar_jpegs,
    )


@pytest.fixture(scope="session")
def user_models() -> Path:
    """The ``--code-path`` holding the ``tiny_models`` package."""
    return USER_MODELS


@pytest.fixture
def save_pt(tmp_path: Path) -> Callable[[object, str], Path]:
    """``save_pt(obj, "name.pt")`` writes ``obj`` with torch.save into the test's directory."""

    def _save(obj: object, name: str) -> Path:
        path = tmp_path / name
        torch.save(obj, path)
        return path

    return _save
