"""export.imagefolder: what an ImageFolder directory or tarball holds, and what it leaves out."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from export import imagefolder
from export.images import IMAGE_SUFFIXES


def _layout(root: Path) -> Path:
    for name in ("cat/b.jpg", "cat/a.PNG", "cat/.hidden.jpg", "dog/x.webp", "dog/notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    (root / "dog" / "more").mkdir()  # a folder inside a class: not read
    (root / "empty").mkdir()
    (root / ".cache").mkdir()  # hidden: not a class
    (root / "LICENSE").write_text("outside any class folder")
    return root


def test_a_directory(tmp_path: Path) -> None:
    folder = imagefolder.scan(_layout(tmp_path), suffixes=IMAGE_SUFFIXES)
    assert not folder.tar
    assert [(e.label, e.name) for e in folder.entries] == [
        ("cat", "cat/.hidden.jpg"),
        ("cat", "cat/a.PNG"),
        ("cat", "cat/b.jpg"),
        ("dog", "dog/x.webp"),
    ]
    assert folder.classes == ("cat", "dog")
    assert folder.skipped == ("LICENSE", "dog/more", "dog/notes.txt")
    assert folder.empty == ("empty",)
    assert dict(folder.read([3, 1])) == {1: b"cat/a.PNG", 3: b"dog/x.webp"}


def test_a_tarball_keeps_the_archive_order_within_a_class(tmp_path: Path) -> None:
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("train/", "train/dog/", "train/empty/", "train/cat/"):
            info = tarfile.TarInfo(name.rstrip("/"))
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name in ("train/dog/2.jpg", "train/cat/9.jpg", "train/dog/1.jpg", "README.md"):
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    folder = imagefolder.scan(archive, suffixes=IMAGE_SUFFIXES)
    assert folder.tar
    assert [e.name for e in folder.entries] == [
        "train/cat/9.jpg",
        "train/dog/2.jpg",
        "train/dog/1.jpg",
    ]
    assert (folder.classes, folder.empty, folder.skipped) == (
        ("cat", "dog"),
        ("empty",),
        ("README.md",),
    )
    assert dict(folder.read()) == {
        0: b"train/cat/9.jpg",
        1: b"train/dog/2.jpg",
        2: b"train/dog/1.jpg",
    }


def test_neither_a_folder_nor_a_tarball(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match="is neither an ImageFolder directory nor a tar"):
        imagefolder.scan(tmp_path / "x.zip", suffixes=IMAGE_SUFFIXES)
