"""Class names: CIFAR-10's, ImageNet-1k's (from torchvision, no download) or a user's file."""

from __future__ import annotations

from pathlib import Path

from export.errors import ExportError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""In torchvision's ``CIFAR10.classes`` order, which is also the sorted folder order."""


def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k names in index order, as torchvision's weights carry them."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def read_labels(path: Path) -> tuple[str, ...]:
    """One class name per line, in index order; blank lines and surrounding spaces ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"cannot read labels file {path}: {exc.strerror or exc}") from exc
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise ExportError(f"labels file {path} has no labels (expected one name per line)")
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ExportError(f"labels file {path} repeats {', '.join(map(repr, duplicates[:5]))}")
    return labels
