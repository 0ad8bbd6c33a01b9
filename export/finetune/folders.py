"""The user's ImageFolder: its classes (the class folders' names, sorted: index i is label
i), its images, and the validation images (a second folder, or a stratified share).

Files that are not images are skipped and counted: by suffix when the folder is listed
(:mod:`export.imagefolder`), by their header here (a text file named .jpg). A class folder
without images, or fewer than two classes, is refused: the head would have a class it never
sees, or nothing to tell apart.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from export import imagefolder
from export.errors import ExportError
from export.images import IMAGE_SUFFIXES
from service.preprocess import FORMATS

log = logging.getLogger("export.finetune")

_SHOWN = 5


@dataclass(frozen=True)
class Labelled:
    """Image files and their class indices, in the same order."""

    files: tuple[Path, ...]
    targets: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class Folders:
    """The training and validation images and the class names (index i is label i)."""

    classes: tuple[str, ...]
    train: Labelled
    val: Labelled


def read(data: Path, *, val_data: Path | None, val_fraction: float, seed: int) -> Folders:
    """The images of ``data`` (and ``val_data``, else a stratified ``val_fraction`` of
    ``data`` drawn with ``seed``). Raises :class:`ExportError` for fewer than two classes,
    a class without images, or no validation images."""
    files = _listing(data, "--data")
    classes = tuple(sorted(files))
    if len(classes) < 2:
        found = f" ({', '.join(classes)})" if classes else ""
        raise ExportError(
            f"--data {data} holds {len(classes)} class folder(s) with images{found}: "
            "fine-tuning needs at least 2, one folder of images per class"
        )
    if val_data is None:
        train, val = _split(files, classes, val_fraction, seed)
    else:
        train = _labelled(files, classes)
        val_files = _listing(val_data, "--val-data")
        if not val_files:
            raise ExportError(
                f"--val-data {val_data} holds no class folder with images"
                " (root/<class>/<image>, the layout of --data)"
            )
        unknown = sorted(set(val_files) - set(classes))
        if unknown:
            raise ExportError(
                f"--val-data {val_data} has classes that --data lacks: {', '.join(unknown)}"
            )
        val = _labelled(val_files, classes)
    if not len(val):
        raise ExportError(
            f"no images held out for validation from {data}: raise --val-fraction"
            " (each class needs at least 2 images) or give --val-data"
        )
    log.info(
        "data: %d classes, %d training and %d validation images",
        len(classes),
        len(train),
        len(val),
    )
    return Folders(classes, train, val)


def _listing(root: Path, flag: str) -> dict[str, list[Path]]:
    """Class name -> its image files, checked by header; what is not an image is skipped
    and counted, and a class folder without images is refused."""
    if not root.is_dir():
        raise ExportError(
            f"{flag} {root} is not a directory: expected an ImageFolder, one folder of images"
            " per class (root/<class>/<image>)"
        )
    folder = imagefolder.scan(root, suffixes=IMAGE_SUFFIXES)
    files: dict[str, list[Path]] = {}
    skipped = list(folder.skipped)
    for entry in folder.entries:
        path = root / entry.name
        if _is_image(path):
            files.setdefault(entry.label, []).append(path)
        else:
            skipped.append(entry.name)
    empty = sorted({*folder.empty, *(e.label for e in folder.entries)} - set(files))
    if empty:
        raise ExportError(
            f"{flag} {root}: class folder(s) without images: {', '.join(empty)}"
            " (add images or remove the folder)"
        )
    if skipped:
        log.warning(
            "%s %s: skipped %d file(s) that are not images in a class folder: %s%s",
            flag,
            root,
            len(skipped),
            ", ".join(skipped[:_SHOWN]),
            ", ..." if len(skipped) > _SHOWN else "",
        )
    return files


def _is_image(path: Path) -> bool:
    """Whether the file's header is one of the formats the service decodes."""
    try:
        with Image.open(path, formats=FORMATS):
            return True
    except Exception:  # Pillow raises many types on what is not an image
        return False


def _labelled(files: dict[str, list[Path]], classes: tuple[str, ...]) -> Labelled:
    pairs = [(path, classes.index(c)) for c in sorted(files) for path in files[c]]
    return Labelled(tuple(p for p, _ in pairs), tuple(t for _, t in pairs))


def _split(
    files: dict[str, list[Path]], classes: tuple[str, ...], fraction: float, seed: int
) -> tuple[Labelled, Labelled]:
    """``fraction`` of each class held out (rounded; at least one image, and at least one
    left to train on, where a class has two or more)."""
    rng = random.Random(seed)
    train: dict[str, list[Path]] = {}
    val: dict[str, list[Path]] = {}
    for c in classes:
        paths = list(files[c])
        rng.shuffle(paths)
        n_val = min(max(round(fraction * len(paths)), 1 if fraction > 0 else 0), len(paths) - 1)
        val[c], train[c] = sorted(paths[:n_val]), sorted(paths[n_val:])
    return _labelled(train, classes), _labelled({c: v for c, v in val.items() if v}, classes)
