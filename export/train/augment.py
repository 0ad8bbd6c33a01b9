"""The paper's augmentation, done on whole batches of uint8 images, and the normalization."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class Augment:
    """The paper's augmentation on a whole uint8 NHWC batch: pad 4, random crop, flip.

    ``cutout`` > 0 adds Cutout (DeVries & Taylor 2017), which is not in the paper: a
    ``cutout`` x ``cutout`` square at a random centre (clipped at the border) is set to
    the mean colour, 0 after normalization. It draws after the flip, so with it off the
    random stream, and so every earlier run, is unchanged.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], pad: int = 4, cutout: int = 0
    ) -> None:
        self.pad = pad
        self.cutout = cutout
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255.0

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 NHWC -> normalized float32 NCHW, laid out channels_last."""
        x = images.permute(0, 3, 1, 2).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def __call__(self, images: Tensor, g: torch.Generator) -> Tensor:
        """A normalized, augmented copy of ``images``, every random draw from ``g``."""
        n, h, w, _ = images.shape
        padded = F.pad(images, (0, 0, self.pad, self.pad, self.pad, self.pad))
        oy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        ox = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [n, h, 1]
        cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [n, 1, w]
        crops = padded[torch.arange(n)[:, None, None], rows, cols]  # [n, h, w, 3]
        flip = torch.rand(n, generator=g) < 0.5
        crops = torch.where(flip[:, None, None, None], crops.flip(2), crops)
        x = self.normalize(crops)
        if self.cutout:
            cy = torch.randint(0, h, (n,), generator=g)
            cx = torch.randint(0, w, (n,), generator=g)
            dy = torch.arange(h) - (cy[:, None] - self.cutout // 2)  # [n, h]
            dx = torch.arange(w) - (cx[:, None] - self.cutout // 2)  # [n, w]
            rows = (dy >= 0) & (dy < self.cutout)
            cols = (dx >= 0) & (dx < self.cutout)
            hole = rows[:, None, :, None] & cols[:, None, None, :]  # [n, 1, h, w]
            x.masked_fill_(hole, 0.0)
        return x
