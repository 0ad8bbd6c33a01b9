"""Small ImageFolders of real CIFAR-10 JPEGs regrouped into new classes, for the new-head tests.

Shared by tests/export (python -m export.transfer) and tests/e2e (its model served). The
files are the archive's own bytes, read from ``../shared/datasets/cifar10-train.tar.gz``.
"""

from __future__ import annotations

import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import pytest

CIFAR_TAR = Path(__file__).resolve().parents[1].parent / "shared/datasets/cifar10-train.tar.gz"
REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "cifar10-resnet20" / "1" / "model.onnx"
SHIPPED_INT8 = REPO / "models" / "cifar10-resnet20-int8" / "1" / "model.onnx"
FIXTURES = REPO / "tests" / "fixtures" / "cifar10-val"

GROUPS = {
    "flying": ("airplane", "bird"),
    "pet": ("cat", "dog"),
    "road": ("automobile", "truck"),
}
"""Three new classes, each two CIFAR-10 classes the shipped model tells apart."""


def grouped_folder(
    root: Path, groups: Mapping[str, Sequence[str]] = GROUPS, *, per_class: int = 8
) -> Path:
    """``root/<group>/<cifar class>-<file>.jpg``: the first ``per_class`` images of each
    CIFAR-10 class in ``groups``, in archive order."""
    if not CIFAR_TAR.exists():
        pytest.fail(f"{CIFAR_TAR} is missing: the transfer tests fit on its real images")
    group_of = {c: g for g, classes in groups.items() for c in classes}
    taken: dict[str, int] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            cls = path.parent.name
            if not member.isfile() or cls not in group_of or taken.get(cls, 0) >= per_class:
                continue
            data = tar.extractfile(member)
            if data is None:
                continue
            folder = root / group_of[cls]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{cls}-{path.name}").write_bytes(data.read())
            taken[cls] = taken.get(cls, 0) + 1
            if len(taken) == len(group_of) and min(taken.values()) >= per_class:
                break
    return root
