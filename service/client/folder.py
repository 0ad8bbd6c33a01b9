"""Which files under a folder are sent: images by extension, in one sorted order."""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"}
)
"""The formats the service decodes (JPEG, PNG, WebP, GIF, BMP, TIFF), matched case-blind."""


@dataclass(frozen=True)
class Folder:
    """The images under ``root`` (POSIX paths relative to it, sorted) and what was skipped."""

    root: Path
    images: list[str]
    skipped: list[str]


def scan(root: Path, *, ignore: Collection[Path] = ()) -> Folder:
    """Walk ``root`` recursively (not into linked directories) and sort its files.

    A file is an image by its extension, the service sniffs the bytes anyway and rejects
    what is not. Names holding a line break are skipped too: they cannot be one line of
    the index files. ``ignore`` names files never counted (the client's own outputs).
    """
    ignored = {os.path.abspath(path) for path in ignore}
    images: list[str] = []
    skipped: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in files:
            full = os.path.join(directory, name)
            if os.path.abspath(full) in ignored or not os.path.isfile(full):
                continue
            relative = Path(os.path.relpath(full, root)).as_posix()
            is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            one_line = len(relative.splitlines()) == 1
            (images if is_image and one_line else skipped).append(relative)
    return Folder(root, sorted(images), sorted(skipped))
