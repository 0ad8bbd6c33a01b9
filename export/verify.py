"""Every export proves itself: PyTorch and ONNX Runtime on the same inputs, several batch sizes.

Inputs are real images from a folder, preprocessed exactly as the model card says, or
random images (uniform pixels, then normalized: never zeros, which would hide wrong weights).
The relative difference is the largest absolute difference divided by the largest absolute
PyTorch value of that output, so it does not depend on the scale of the logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from export.errors import ExportError
from service.metadata import INPUT_NAME, Preprocessing, Verification

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
"""Relative, in float32. Reordered sums in fused convolutions differ by ~1e-6 of the output
scale; 1e-4 leaves headroom for deep nets yet catches any real mistake (a wrong op, layout
or weight), which moves outputs by whole percents."""
BATCH_SIZES = (1, 8)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True)
class BatchResult:
    batch_size: int
    abs_logits: float
    rel_logits: float
    abs_embedding: float
    rel_embedding: float
    top1_agreement: float


def random_images(n: int, pre: Preprocessing, *, seed: int = 0) -> Tensor:
    """``n`` uniform-noise images, normalized like real ones."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, pre.crop, pre.crop, generator=g)
    return _normalize(pixels, pre)


def folder_images(folder: Path, n: int, pre: Preprocessing) -> Tensor:
    """The first ``n`` images under ``folder`` (sorted, recursive; repeated if fewer)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import v2

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"--verify-images {folder}: no image files found")
    if len(files) < n:
        log.info("verify: %d images in %s, repeating them to fill %d", len(files), folder, n)
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(pre.resize, interpolation=_interpolation(pre), antialias=True),
            v2.CenterCrop(pre.crop),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    batch = []
    for i in range(n):
        path = files[i % len(files)]
        try:
            with Image.open(path) as im:
                batch.append(transform(im.convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise ExportError(f"--verify-images: cannot read {path}: {exc}") from exc
    return _normalize(torch.stack(batch), pre)


def _interpolation(pre: Preprocessing) -> object:
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(pre.interpolation)


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
        abs_l, rel_l = _diff(ref_logits, got_logits)
        abs_e, rel_e = _diff(ref_emb, got_emb)
        agree = float(np.mean(ref_logits.argmax(1) == got_logits.argmax(1)))
        results.append(BatchResult(b, abs_l, rel_l, abs_e, rel_e, agree))
        log.info(
            "verify batch %d: logits max abs %.2e rel %.2e | embedding max abs %.2e rel %.2e"
            " | top-1 agreement %.0f%%",
            b, abs_l, rel_l, abs_e, rel_e, 100 * agree,
        )  # fmt: skip
    return results


def _diff(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    if not (np.isfinite(ref).all() and np.isfinite(got).all()):
        return float("inf"), float("inf")
    abs_diff = float(np.max(np.abs(ref - got)))
    scale = float(np.max(np.abs(ref)))
    return abs_diff, abs_diff / max(scale, float(np.finfo(np.float32).tiny))


def summarize(
    results: list[BatchResult], *, inputs: str, tolerance: float = TOLERANCE
) -> Verification:
    """The worst figures over all batch sizes, as stored in the model card."""
    return Verification(
        inputs=inputs,
        batch_sizes=tuple(r.batch_size for r in results),
        max_abs_diff_logits=max(r.abs_logits for r in results),
        max_rel_diff_logits=max(r.rel_logits for r in results),
        max_abs_diff_embedding=max(r.abs_embedding for r in results),
        max_rel_diff_embedding=max(r.rel_embedding for r in results),
        top1_agreement=min(r.top1_agreement for r in results),
        tolerance=tolerance,
    )


def check(v: Verification) -> None:
    """Fail when ONNX Runtime disagrees with PyTorch beyond the float32 tolerance."""
    worst = max(v.max_rel_diff_logits, v.max_rel_diff_embedding)
    if not worst <= v.tolerance:  # also catches NaN
        raise ExportError(
            f"verification failed: ONNX Runtime differs from PyTorch by {worst:.2e} relative "
            f"(logits {v.max_rel_diff_logits:.2e}, embedding {v.max_rel_diff_embedding:.2e}), "
            f"tolerance {v.tolerance:.0e}"
        )


def report(results: list[BatchResult], v: Verification) -> str:
    """A small table for the terminal."""
    lines = [
        f"verification on {v.inputs} inputs (PyTorch eval vs ONNX Runtime CPU, "
        f"tolerance {v.tolerance:.0e} relative)",
        f"  {'batch':>5}  {'logits abs':>10}  {'logits rel':>10}  {'emb abs':>10}  "
        f"{'emb rel':>10}  {'top-1 agree':>11}",
    ]
    for r in results:
        lines.append(
            f"  {r.batch_size:>5}  {r.abs_logits:>10.2e}  {r.rel_logits:>10.2e}  "
            f"{r.abs_embedding:>10.2e}  {r.rel_embedding:>10.2e}  {r.top1_agreement:>10.0%}"
        )
    return "\n".join(lines)
