"""export.data: image folders in memory, the fixed stratified split, channel statistics."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from export import data


def test_stratified_split_is_fixed_and_balanced() -> None:
    targets = torch.arange(10).repeat_interleave(50)
    train_idx, val_idx = data.stratified_split(targets, 5, seed=0)
    assert len(val_idx) == 50 and len(train_idx) == 450
    assert torch.bincount(targets[val_idx]).tolist() == [5] * 10
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    again = data.stratified_split(targets, 5, seed=0)[1]
    assert torch.equal(val_idx, again)
    assert not torch.equal(val_idx, data.stratified_split(targets, 5, seed=1)[1])


def test_channel_stats_on_known_pixels() -> None:
    images = torch.zeros(2, 1, 1, 3, dtype=torch.uint8)
    images[1] = 255
    mean, std = data.channel_stats(images)
    assert mean == pytest.approx([0.5, 0.5, 0.5])
    assert std == pytest.approx([2**-0.5] * 3)  # sample std of {0, 1}


def test_load_reads_an_imagefolder(tmp_path: Path) -> None:
    for name, colour in (("b", (0, 0, 255)), ("a", (255, 0, 0))):
        (tmp_path / name).mkdir()
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
        (tmp_path / name / "x.png").write_bytes(buf.getvalue())
    ds = data.load(str(tmp_path), size=32, progress=False)
    assert ds.classes == ("a", "b")
    assert ds.images.shape == (2, 32, 32, 3)
    assert ds.images[ds.targets == 0][0, 0, 0].tolist() == [255, 0, 0]


def test_load_split_holds_out_the_stratified_split(data_source: str) -> None:
    """Training and validation sides are stratified_split's, and the statistics are the
    training side's alone (the held-out images must not shape the normalization)."""
    split = data.load_split(data_source, size=32, val_per_class=2, seed=0, progress=False)
    whole = data.load(data_source, size=32, progress=False)
    train_idx, val_idx = data.stratified_split(whole.targets, 2, seed=0)
    assert split.classes == whole.classes and len(split.classes) == 10
    assert (len(split.train), len(split.val)) == (280, 20)
    assert torch.equal(split.val.images, whole.images[val_idx])
    assert torch.equal(split.train.targets, whole.targets[train_idx])
    mean, std = data.channel_stats(whole.images[train_idx])
    assert list(split.mean) == mean and list(split.std) == std
    assert list(split.mean) != data.channel_stats(whole.images)[0]
