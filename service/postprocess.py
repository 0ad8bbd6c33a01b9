"""Engine outputs -> what clients get: the top-k classes of a row, normalized embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_predictions(
    scores: np.ndarray, k: int, labels: Sequence[str], ranking: np.ndarray | None = None
) -> list[dict[str, object]]:
    """The k best classes of one row of scores (probabilities or logits), best first.

    Returns ``{"index", "label", "score"}`` dicts; equal scores keep the lower index first.
    ``ranking`` is the row's class indices already sorted that way (the engine's
    ``ranking`` output), which saves sorting here.
    """
    if ranking is not None:
        order = ranking[:k]
    else:
        if k < scores.shape[0]:
            candidates = np.argpartition(scores, -k)[-k:]
            candidates.sort()
        else:
            candidates = np.arange(scores.shape[0])
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
    values = scores[order].tolist()
    return [
        {"index": index, "label": labels[index], "score": value}
        for index, value in zip(order.tolist(), values, strict=True)
    ]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), like torch's F.normalize."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))
