"""An ImageFolder (``root/<class>/<image>``) or a tar archive of one, listed without PyTorch.

Training (:mod:`export.data`) and a new head on a served model (:mod:`export.transfer`) read
labelled images the same way: a directory's class folders, or a tar's members grouped by
their parent folder (``train/cat/0001.jpg`` is a ``cat``, the layout of
``shared/datasets/cifar10-train.tar.gz``). The listing keeps what was left out, so a
command can say so: files that are not images (by suffix) or not inside a class folder,
and class folders that hold no image at all. Bytes are read only when asked for, so a
folder of large photos is never held in memory at once.
"""

from __future__ import annotations

import tarfile
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class Entry:
    """One image: its class (the folder it is in) and where it is (a path or member name)."""

    label: str
    name: str


@dataclass(frozen=True)
class ImageFolder:
    """The images of a folder or archive, in a fixed order, and what was left out of it."""

    source: Path
    tar: bool
    """Whether ``source`` is a tar archive (else a directory)."""
    entries: tuple[Entry, ...]
    """By class name; within a class, by file name (a folder) or in archive order (a tar)."""
    skipped: tuple[str, ...]
    """Files that are not images, or not inside a class folder."""
    empty: tuple[str, ...]
    """Class folders that hold no image file."""

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes with at least one image, sorted: index i is label i."""
        return tuple(sorted({e.label for e in self.entries}))

    def read(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, bytes]]:
        """``(index, file bytes)`` of the entries asked for (all by default).

        In entry order for a folder; in archive order for a tar, which is read once through.
        """
        wanted = range(len(self.entries)) if indices is None else sorted(set(indices))
        if not self.tar:
            for i in wanted:
                yield i, (self.source / self.entries[i].name).read_bytes()
            return
        where = {self.entries[i].name: i for i in wanted}
        with tarfile.open(self.source, "r:*") as tar:
            for member in tar:
                index = where.get(member.name)
                f = tar.extractfile(member) if index is not None else None
                if index is not None and f is not None:
                    yield index, f.read()


def scan(source: Path | str, *, suffixes: Collection[str]) -> ImageFolder:
    """List the ImageFolder directory or tar archive ``source``; images by ``suffixes``.

    Raises FileNotFoundError when ``source`` is neither (the message names ``source``).
    """
    path = Path(source)
    if path.is_dir():
        return _scan_dir(path, suffixes)
    if path.is_file() and tarfile.is_tarfile(path):
        return _scan_tar(path, suffixes)
    raise FileNotFoundError(
        f"{str(source)!r} is neither an ImageFolder directory nor a tar archive of one"
    )


def _scan_dir(root: Path, suffixes: Collection[str]) -> ImageFolder:
    entries, skipped, empty = [], [], []
    for item in sorted(root.iterdir()):
        if item.name.startswith("."):
            continue
        if not item.is_dir():
            skipped.append(item.name)
            continue
        found = 0
        for p in sorted(item.iterdir()):
            if p.is_file() and p.suffix.lower() in suffixes:
                entries.append(Entry(item.name, f"{item.name}/{p.name}"))
                found += 1
            elif not p.name.startswith("."):
                skipped.append(f"{item.name}/{p.name}")
        if not found:
            empty.append(item.name)
    return ImageFolder(root, False, tuple(entries), tuple(skipped), tuple(empty))


def _scan_tar(path: Path, suffixes: Collection[str]) -> ImageFolder:
    entries, skipped = [], []
    folders: set[str] = set()
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            p = PurePosixPath(member.name)
            if member.isdir():
                folders.add(p.name)
            elif member.isfile() and len(p.parts) >= 2 and p.suffix.lower() in suffixes:
                entries.append(Entry(p.parent.name, member.name))
            elif member.isfile():
                skipped.append(member.name)
    # Sorted by class only, stably: the order within a class is the archive's, which the
    # training split (export.data.stratified_split) has always been drawn from.
    entries.sort(key=lambda e: e.label)
    labels = {e.label for e in entries}
    parents = {PurePosixPath(e.name).parent.parent.name for e in entries}
    empty = sorted(folders - labels - parents)
    return ImageFolder(path, True, tuple(entries), tuple(skipped), tuple(empty))
