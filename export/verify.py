"""Every export proves itself: PyTorch and ONNX Runtime on the same inputs, several batch sizes.

Inputs are real images from a folder, preprocessed exactly as the model card says (the
service's own transform, crop rounding included), or random images (uniform pixels, then
normalized: never zeros, which would hide wrong weights).
The figures and the tolerance are :mod:`export.agreement`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from export.agreement import BATCH_SIZES, BatchResult, diff
from export.errors import ExportError
from export.images import verification_rows
from service.metadata import INPUT_NAME, Preprocessing

log = logging.getLogger(__name__)


def random_images(n: int, pre: Preprocessing, *, seed: int = 0) -> Tensor:
    """``n`` uniform-noise images, normalized like real ones."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, pre.crop, pre.crop, generator=g)
    return _normalize(pixels, pre)


def folder_images(folder: Path, n: int, pre: Preprocessing) -> Tensor:
    """The first ``n`` images under ``folder``, as the service will feed them to the model
    (the card's ``crop_rounding`` included): :func:`export.images.verification_rows`."""
    return torch.from_numpy(verification_rows(folder, n, pre))


def _normalize(pixels: Tensor, pre: Preprocessing) -> Tensor:
    if pre.channel_order == "BGR":
        pixels = pixels.flip(1)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def compare(
    model: nn.Module,
    onnx_bytes: bytes,
    images: Tensor,
    *,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> list[BatchResult]:
    """Run both engines on ``images[:b]`` for each ``b`` and measure the differences."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    results = []
    model.eval()
    for b in batch_sizes:
        x = images[:b]
        with torch.no_grad():
            ref_logits, ref_emb = (t.numpy() for t in model(x))
        got_logits, got_emb = session.run(None, {INPUT_NAME: x.numpy()})
        for name, ref, got in (("logits", ref_logits, got_logits), ("embedding", ref_emb, got_emb)):
            if ref.shape != got.shape:
                raise ExportError(
                    f"batch {b}: ONNX Runtime's {name} has shape {list(got.shape)}, "
                    f"PyTorch's {list(ref.shape)}"
                )
        abs_l, rel_l = diff(ref_logits, got_logits)
        abs_e, rel_e = diff(ref_emb, got_emb)
        agree = float(np.mean(ref_logits.argmax(1) == got_logits.argmax(1)))
        results.append(BatchResult(b, abs_l, rel_l, abs_e, rel_e, agree))
        log.info(
            "verify batch %d: logits max abs %.2e rel %.2e | embedding max abs %.2e rel %.2e"
            " | top-1 agreement %.0f%%",
            b, abs_l, rel_l, abs_e, rel_e, 100 * agree,
        )  # fmt: skip
    return results
