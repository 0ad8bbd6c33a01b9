"""Fixtures for the export tests: real JPEGs, trained-looking CIFAR models, one shared export.

Exports take seconds each on two cores, so every ONNX file here is made once per session
and read by many tests.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from export_testlib import trained_like, training_checkpoint
from torch import nn

from export.api import ExportResult, export_model

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
def trained_r20(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A trained-looking ResNet-20 (option A) and its training-script checkpoint file."""
    model = trained_like("cifar-resnet20", seed=20)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save(training_checkpoint(model, "cifar-resnet20"), path)
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
