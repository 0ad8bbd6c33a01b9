"""export.reencode: a lower-quality copy that trains and evaluates on the same split."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export import data, reencode

CLASSES = ("cat", "dog", "frog")
PER_CLASS = 12


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def source_tar(tmp_path: Path) -> Path:
    """A .tar.gz ImageFolder whose members are not in name order, each image distinct
    (smooth random colours: 4x4 noise enlarged), so a copy that reorders them is caught."""
    rng = np.random.default_rng(0)
    path = tmp_path / "src.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for cls in CLASSES:
            for j in reversed(range(PER_CLASS)):  # reversed: tar order is not name order
                small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                blob = _jpeg(np.asarray(small.resize((32, 32), Image.Resampling.BICUBIC)))
                info = tarfile.TarInfo(f"train/{cls}/{j:04d}.jpg")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path


def test_copy_keeps_classes_order_and_split(source_tar: Path, tmp_path: Path) -> None:
    out = tmp_path / "q50"
    stale = tmp_path / "q50.partial" / "cat" / "999999.jpg"  # left by an interrupted run
    stale.parent.mkdir(parents=True)
    stale.write_bytes(_jpeg(np.zeros((32, 32, 3), np.uint8)))
    assert reencode.main([str(source_tar), str(out), "--quality", "50"]) == 0

    src, new = data.load(str(source_tar)), data.load(str(out))
    assert new.classes == src.classes == CLASSES
    assert torch.equal(new.targets, src.targets)
    # Image i of the copy is image i of the source, a little degraded: per-image error is
    # far below the distance between any two different images of the set.
    a, b = src.images.float(), new.images.float()
    same = (a - b).abs().mean(dim=(1, 2, 3))
    others = (a - b.roll(1, dims=0)).abs().mean(dim=(1, 2, 3))
    assert same.max() < 10 and others.min() > 20
    assert same.mean() > 0  # it was re-encoded, not copied
    # So the held-out split (by position) holds out the same images.
    train_a, val_a = data.stratified_split(src.targets, 2, seed=0)
    train_b, val_b = data.stratified_split(new.targets, 2, seed=0)
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)


def test_lower_quality_moves_pixels_further(source_tar: Path, tmp_path: Path) -> None:
    def psnr(quality: int) -> float:
        argv = [str(source_tar), str(tmp_path / f"q{quality}"), f"--quality={quality}"]
        return reencode.run(reencode.parse_args(argv))

    assert psnr(95) > psnr(50) > psnr(10) > 10


def test_refuses_an_existing_directory_and_a_bad_quality(
    source_tar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    assert reencode.main([str(source_tar), str(out), "--quality", "50"]) == 1
    assert "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        reencode.parse_args([str(source_tar), str(tmp_path / "new"), "--quality", "100"])
    assert exc.value.code == 2
    assert "1-95" in capsys.readouterr().err
