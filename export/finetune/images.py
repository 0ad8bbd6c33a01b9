"""Batches of the user's images: ImageNet-style augmentation for training, the model's own
eval transform for validation, read from disk by loader processes.

Decoding is the service's (:class:`service.preprocess.Preprocessor`: EXIF orientation,
transparency on white, large JPEGs DCT-scaled), so the model learns from what it will be
sent, and validation runs the exact transform the export writes into the model card. An
image whose data fails to decode (a truncated JPEG) is skipped and counted. Every random
draw of an image comes from the seed, its epoch and its index, so a resumed run sees the
same batches as an uninterrupted one, whatever the number of loader processes.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from export.finetune.folders import Labelled
from export.images import MAX_PIXELS
from service.errors import ServiceError
from service.metadata import Preprocessing
from service.preprocess import Preprocessor, normalization_table

log = logging.getLogger("export.finetune")

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
"""RandomResizedCrop's area and aspect-ratio ranges (torchvision's defaults, Inception's)."""


class _Images(Dataset[tuple[Tensor, int] | None]):
    """Decoded, transformed images; None for one whose data fails to decode."""

    def __init__(self, items: Labelled, pre: Preprocessing) -> None:
        self.items = items
        self.pre = pre
        self.decoder = Preprocessor(pre, max_pixels=MAX_PIXELS, draft=True)

    def __len__(self) -> int:
        return len(self.items)

    def _decode(self, index: int) -> Image.Image | None:
        path = self.items.files[index]
        try:
            return self.decoder.decode(path.read_bytes())
        except (OSError, ServiceError) as exc:
            log.warning("skipping %s: %s", path, exc)
            return None


class EvalImages(_Images):
    """The model card's eval transform, as the service computes it."""

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        image = self._decode(index)
        if image is None:
            return None
        return torch.from_numpy(self.decoder.transform(image)), self.items.targets[index]


class TrainImages(_Images):
    """RandomResizedCrop to the model's input size (with the card's filter) and a random
    horizontal flip, then the card's normalization; indexed by (epoch, image)."""

    def __init__(self, items: Labelled, pre: Preprocessing, *, seed: int) -> None:
        super().__init__(items, pre)
        self.seed = seed
        self.table = normalization_table(pre.mean, pre.std)
        self.resample = Image.Resampling[pre.interpolation.upper()]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int] | None:
        epoch, index = key
        image = self._decode(index)
        if image is None:
            return None
        rng = random.Random(f"{self.seed}/{epoch}/{index}")  # str seeds: the same every run
        left, top, width, height = crop_box(image.width, image.height, rng)
        size = (self.pre.crop, self.pre.crop)
        # Crop, then resize: torchvision's resized_crop on a PIL image, pixel for pixel.
        image = image.crop((left, top, left + width, top + height)).resize(size, self.resample)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image)
        out = np.empty((3, *size), dtype=np.float32)
        for c in range(3):
            np.take(self.table[c], pixels[:, :, c], out=out[c])
        return torch.from_numpy(out), self.items.targets[index]


def crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a RandomResizedCrop: torchvision's algorithm (ten
    tries at a random area and aspect ratio, else a centre crop clamped to the ratios),
    drawing from ``rng``."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class EpochOrder(Sampler[tuple[int, int]]):
    """(epoch, index) keys in the epoch's shuffled order; set :attr:`epoch` before each."""

    def __init__(self, count: int, *, seed: int) -> None:
        self.count = count
        self.seed = seed
        self.epoch = 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return ((self.epoch, i) for i in torch.randperm(self.count, generator=g).tolist())


def collate(items: list[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor, int]:
    """(images, targets, how many failed to decode) of a batch."""
    kept = [item for item in items if item is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), len(items)
    images = torch.stack([x for x, _ in kept])
    targets = torch.tensor([t for _, t in kept], dtype=torch.int64)
    return images, targets, len(items) - len(kept)


def loader(
    dataset: _Images,
    *,
    batch_size: int,
    workers: int,
    pin: bool,
    sampler: Sampler[tuple[int, int]] | None = None,
) -> DataLoader[tuple[Tensor, Tensor, int]]:
    """Batches of ``dataset`` read by ``workers`` processes (0: in this one)."""
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )


def batches(
    loader: DataLoader[tuple[Tensor, Tensor, int]], what: str
) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader's non-empty batches, channels_last; logs how many images failed."""
    failed = 0
    for images, targets, bad in loader:
        failed += bad
        if len(targets):
            yield images.contiguous(memory_format=torch.channels_last), targets
    if failed:
        log.warning("%s: skipped %d image(s) whose data could not be decoded", what, failed)
