"""Embeddings of an image folder from a served model, through its card's own preprocessing.

Each file is decoded and transformed by the service's :class:`Preprocessor` (what
``/predict`` and ``/embed`` do to a request, JPEG draft decoding included) and run through
the model with ONNX Runtime in batches, so the features a head is fitted on are the
features the served model computes. Files that cannot be decoded are skipped and named,
never fatal one by one. Only the embeddings are kept, not the images. Torch-free.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from export import images
from export.errors import ExportError
from export.imagefolder import ImageFolder
from export.onnx_verify import first_line
from service.errors import ServiceError
from service.metadata import EMBEDDING_NAME, INPUT_NAME, Preprocessing
from service.preprocess import Preprocessor

log = logging.getLogger(__name__)

BATCH_SIZE = 64


@dataclass(frozen=True)
class Embedded:
    """float32 [N, D] embeddings, the folder entry each row came from, and the unreadable."""

    embeddings: np.ndarray
    indices: np.ndarray
    unreadable: tuple[str, ...]


def embed(
    folder: ImageFolder,
    session: ort.InferenceSession,
    pre: Preprocessing,
    *,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
) -> Embedded:
    """The ``embedding`` output of ``session`` for every image of ``folder``."""
    out: list[np.ndarray] = []
    kept: list[int] = []
    unreadable: list[str] = []
    batch: list[np.ndarray] = []
    bar = tqdm(rows(folder, pre), total=len(folder.entries), desc="embed", unit="img",
               disable=not progress)  # fmt: skip
    for index, row in bar:
        if row is None:
            unreadable.append(folder.entries[index].name)
            continue
        kept.append(index)
        batch.append(row)
        if len(batch) == batch_size:
            out.append(run(session, np.stack(batch)))
            batch = []
    if batch:
        out.append(run(session, np.stack(batch)))
    if unreadable:
        log.warning(
            "skipped %d of %d files that are not readable images: %s",
            len(unreadable), len(folder.entries), ", ".join(unreadable[:5]),
        )  # fmt: skip
    width = out[0].shape[1] if out else 0
    return Embedded(
        np.concatenate(out) if out else np.zeros((0, width), np.float32),
        np.asarray(kept, dtype=np.int64),
        tuple(unreadable),
    )


def rows(
    folder: ImageFolder, pre: Preprocessing, indices: Iterable[int] | None = None
) -> Iterator[tuple[int, np.ndarray | None]]:
    """``(entry index, float32 [3, crop, crop], or None when it cannot be decoded)`` for the
    entries asked for (all by default), in :meth:`ImageFolder.read`'s order."""
    preprocessor = Preprocessor(pre, max_pixels=images.MAX_PIXELS, draft=True)
    for index, data in folder.read(indices):
        try:
            yield index, preprocessor(data)
        except (OSError, ServiceError) as exc:
            log.debug("skipping %s: %s", folder.entries[index].name, exc)
            yield index, None


def run(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """The ``embedding`` output for a float32 batch; ONNX Runtime's failure as one line."""
    try:
        (embedding,) = session.run([EMBEDDING_NAME], {INPUT_NAME: batch})
    except Exception as exc:  # ORT's own exception types
        raise ExportError(f"the model fails on a batch of {len(batch)}: {first_line(exc)}") from exc
    return np.asarray(embedding, dtype=np.float32)
