"""Image-classification data held in memory as uint8 tensors, for training on CIFAR-sized sets.

Sources: an ImageFolder directory (``root/<class>/<image>``), a ``.tar.gz`` of one (the
layout of ``shared/datasets/cifar10-train.tar.gz``), or ``torchvision:cifar10`` to use
torchvision's download when the machine is online.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from export import imagefolder

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


@dataclass(frozen=True)
class Dataset:
    """``images`` uint8 [N, H, W, 3], ``targets`` int64 [N], class names in index order."""

    images: torch.Tensor
    targets: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.images[index], self.targets[index], self.classes)


def decode_rgb(data: bytes, size: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] pixels of an image file's bytes, resized to ``size`` square if given."""
    with Image.open(io.BytesIO(data)) as f:
        im = f.convert("RGB")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _assemble(
    items: list[tuple[str, bytes]], size: int | None, limit: int | None, desc: str, progress: bool
) -> Dataset:
    classes = tuple(sorted({c for c, _ in items}))
    if not classes:
        raise ValueError(f"{desc}: no images found (expected <class>/<image> files)")
    if limit is not None:
        items = _take_per_class(items, classes, limit)
    index = {c: i for i, c in enumerate(classes)}
    bar = tqdm(items, desc=f"decode {desc}", unit="img", disable=not progress)
    images = [decode_rgb(b, size) for _, b in bar]
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise ValueError(f"{desc}: images differ in size {sorted(shapes)[:3]}; pass a size")
    return Dataset(
        torch.from_numpy(np.stack(images)),
        torch.tensor([index[c] for c, _ in items], dtype=torch.int64),
        classes,
    )


def _take_per_class(
    items: list[tuple[str, bytes]], classes: tuple[str, ...], limit: int
) -> list[tuple[str, bytes]]:
    """The first ``limit`` images overall, spread evenly over classes (for smoke runs)."""
    per_class = max(1, limit // len(classes))
    taken: dict[str, int] = {}
    out = []
    for c, b in items:
        if taken.get(c, 0) < per_class:
            taken[c] = taken.get(c, 0) + 1
            out.append((c, b))
    return out


def _from_torchvision(root: Path) -> Dataset:
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(str(root), train=True, download=True)
    return Dataset(
        torch.from_numpy(ds.data), torch.tensor(ds.targets, dtype=torch.int64), tuple(ds.classes)
    )


def read_files(source: str) -> list[tuple[str, bytes]]:
    """(class name, file bytes) of every image in an ImageFolder directory or a tar of one,
    ordered by class (stably, so that the split of ``stratified_split`` is reproducible)."""
    try:
        folder = imagefolder.scan(source, suffixes=IMAGE_SUFFIXES)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--data: {exc}, nor torchvision:cifar10") from exc
    read = dict(folder.read())
    return [(e.label, read[i]) for i, e in enumerate(folder.entries)]


def load(
    source: str, *, size: int | None = None, limit: int | None = None, progress: bool = True
) -> Dataset:
    """Load a whole data set into memory.

    ``size`` resizes every image to ``size`` x ``size`` (None keeps them, which must then
    agree); ``limit`` keeps about that many images, balanced over classes.
    """
    if source.startswith("torchvision:"):
        name = source.split(":", 1)[1]
        if name.lower() != "cifar10":
            raise ValueError(f"only torchvision:cifar10 is supported, got {source!r}")
        ds = _from_torchvision(Path.home() / ".cache" / "torchvision")
        return ds if limit is None else ds.subset(torch.arange(min(limit, len(ds))))
    items = read_files(source)
    return _assemble(items, size, limit, Path(source).name, progress)


def stratified_split(
    targets: torch.Tensor, val_per_class: int, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) with ``val_per_class`` images of every class held out.

    The same seed gives the same split on every machine (torch's CPU generator).
    """
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in targets.unique(sorted=True).tolist():
        idx = (targets == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        # Small (smoke-test) sets hold out a fifth rather than emptying the training side.
        n_val = min(val_per_class, max(1, len(idx) // 5))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 [N, H, W, 3] images, on the 0..1 scale."""
    x = images.reshape(-1, 3).to(torch.float64) / 255.0
    return x.mean(0).tolist(), x.std(0).tolist()


@dataclass(frozen=True)
class TrainVal:
    """A data set split for training: both sides, and the training side's channel statistics
    (the normalization the model learns with, and which its checkpoint carries to serving)."""

    train: Dataset
    val: Dataset
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_split(
    source: str,
    *,
    size: int,
    val_per_class: int,
    seed: int,
    limit: int | None = None,
    progress: bool = True,
) -> TrainVal:
    """Load ``source`` (see :func:`load`) and hold ``val_per_class`` images of each class out
    (see :func:`stratified_split`)."""
    ds = load(source, size=size, limit=limit, progress=progress)
    train_idx, val_idx = stratified_split(ds.targets, val_per_class, seed=seed)
    train = ds.subset(train_idx)
    (mr, mg, mb), (sr, sg, sb) = channel_stats(train.images)
    return TrainVal(train, ds.subset(val_idx), ds.classes, (mr, mg, mb), (sr, sg, sb))
