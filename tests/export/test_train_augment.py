"""The paper's augmentation (pad, crop, flip) and Cutout, on whole uint8 batches."""

from __future__ import annotations

import pytest
import torch

from export.train.augment import Augment


def test_augment_crops_flips_and_normalizes() -> None:
    """Each output is a 32x32 window of the zero-padded image, maybe mirrored, normalized."""
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    aug = Augment([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    out = aug(images, torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)

    # Undo the normalization and find each output inside its padded source.
    pixels = (out * aug.std + aug.mean).round().permute(0, 2, 3, 1).to(torch.uint8)
    padded = torch.nn.functional.pad(images, (0, 0, 4, 4, 4, 4))
    flipped = 0
    for i in range(16):
        windows = {
            (y, x, f)
            for y in range(9)
            for x in range(9)
            for f in (False, True)
            if torch.equal(
                (
                    padded[i, y : y + 32, x : x + 32].flip(1)
                    if f
                    else padded[i, y : y + 32, x : x + 32]
                ),
                pixels[i],
            )
        }
        assert len(windows) >= 1, f"image {i} is not a padded crop of its source"
        flipped += all(f for _, _, f in windows)
    assert 0 < flipped < 16  # both branches taken with this seed

    again = aug(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


@pytest.mark.parametrize("size", [16, 5])
def test_cutout_blanks_one_square_and_leaves_the_rest(size: int) -> None:
    """--cutout: the same crops and flips as without it, plus one size x size square
    (clipped at the border, so at least half of it per side) set to 0, the mean colour."""
    images = torch.randint(1, 256, (32, 32, 32, 3), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    plain = Augment(mean, std)(images, torch.Generator().manual_seed(2))
    cut = Augment(mean, std, cutout=size)(images, torch.Generator().manual_seed(2))
    assert cut.is_contiguous(memory_format=torch.channels_last)

    clipped = 0
    for i in range(len(images)):
        hole = (cut[i] != plain[i]).any(0)  # [h, w]
        ys, xs = hole.nonzero(as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        assert hole.sum() == (y1 - y0) * (x1 - x0), f"image {i}: the hole is not a rectangle"
        assert (cut[i, :, y0:y1, x0:x1] == 0).all()
        for lo, hi in ((y0, y1), (x0, x1)):
            assert size // 2 <= hi - lo <= size
            assert hi - lo == size or lo == 0 or hi == 32  # only the border clips it
        clipped += (y1 - y0, x1 - x0) != (size, size)
    assert 0 < clipped < len(images)  # both cases drawn with this seed
