"""Image folders read through a model card's own preprocessing, without PyTorch.

What quantization calibrates on and what a variant's agreement is measured on: every
image under a folder (recursively), decoded and transformed exactly as the service does
(:class:`service.preprocess.Preprocessor`), with a progress bar. Files that are not
images, or cannot be decoded, are skipped and counted, never fatal one by one.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export.errors import ExportError
from service.errors import ServiceError
from service.metadata import Preprocessing
from service.preprocess import Preprocessor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
MAX_PIXELS = 1 << 26


@dataclass(frozen=True)
class Rows:
    """Preprocessed images: float32 [N, 3, H, W], where each came from, and what was skipped."""

    array: np.ndarray
    paths: tuple[Path, ...]
    skipped: int
    sha256: str
    """Over the files' bytes in order: which images these were, not how they were read."""


def find_images(folder: Path, *, what: str) -> list[Path]:
    """Every image file under ``folder``, sorted; ``what`` names the flag in errors."""
    if not folder.is_dir():
        raise ExportError(f"{what} {folder} is not a directory")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ExportError(
            f"{what} {folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def sample(files: list[Path], count: int, *, seed: int = 0) -> list[Path]:
    """``count`` of ``files`` drawn without replacement (all of them when fewer), in order."""
    if count >= len(files):
        return list(files)
    picked = random.Random(seed).sample(range(len(files)), count)
    return [files[i] for i in sorted(picked)]


def read_rows(files: list[Path], pre: Preprocessing, *, desc: str, progress: bool = True) -> Rows:
    """Decode and preprocess ``files``; unreadable ones are skipped and counted."""
    preprocessor = Preprocessor(pre, max_pixels=MAX_PIXELS, draft=True)
    digest = hashlib.sha256()
    rows, kept, skipped = [], [], 0
    for path in tqdm(files, desc=desc, unit="img", disable=not progress):
        try:
            data = path.read_bytes()
            rows.append(preprocessor(data))
        except (OSError, ServiceError) as exc:
            log.debug("skipping %s: %s", path, exc)
            skipped += 1
            continue
        digest.update(data)
        kept.append(path)
    if skipped:
        log.warning(
            "%s: skipped %d of %d files that are not readable images", desc, skipped, len(files)
        )
    shape = (0, 3, pre.crop, pre.crop)
    array = np.stack(rows) if rows else np.zeros(shape, np.float32)
    return Rows(array, tuple(kept), skipped, digest.hexdigest())


def verification_rows(
    folder: Path, n: int, pre: Preprocessing, *, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """The first ``n`` images under ``folder`` (sorted, recursive; repeated when fewer), as
    the service feeds them to the model, fully decoded: an export's verification inputs.

    Unlike :func:`read_rows`, an unreadable file fails the export: verification images are
    chosen by the user, and a silently shorter set would verify less than asked.
    """
    files = find_images(folder, what="--verify-images")
    if len(files) < n:
        log.info("verify: %d images in %s, repeating them to fill %d", len(files), folder, n)
    preprocessor = Preprocessor(pre, max_pixels=max_pixels, draft=False)
    rows = []
    for i in range(n):
        path = files[i % len(files)]
        try:
            rows.append(preprocessor(path.read_bytes()))
        except (OSError, ServiceError) as exc:
            raise ExportError(f"--verify-images: cannot read {path}: {exc}") from exc
    return np.stack(rows)


def class_of(path: Path, root: Path) -> str:
    """An ImageFolder's label: the first folder under ``root``."""
    return path.relative_to(root).parts[0]
