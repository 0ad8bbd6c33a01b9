"""How closely two runs of a model agree: the figures every export and adoption stores.

The relative difference is the largest absolute difference divided by the largest absolute
reference value of that output, so it does not depend on the scale of the logits. Needs
numpy only: an adopted ONNX file is checked against the original without PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.errors import ExportError
from service.metadata import Verification

TOLERANCE = 1e-4
"""Relative, in float32. Reordered sums in fused convolutions differ by ~1e-6 of the output
scale; 1e-4 leaves headroom for deep nets yet catches any real mistake (a wrong op, layout
or weight), which moves outputs by whole percents."""
BATCH_SIZES = (1, 8)


@dataclass(frozen=True)
class BatchResult:
    batch_size: int
    abs_logits: float
    rel_logits: float
    abs_embedding: float
    rel_embedding: float
    top1_agreement: float


def diff(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
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


def check(v: Verification, *, reference: str = "PyTorch") -> None:
    """Fail when ONNX Runtime disagrees with the reference beyond the float32 tolerance."""
    worst = max(v.max_rel_diff_logits, v.max_rel_diff_embedding)
    if not worst <= v.tolerance:  # also catches NaN
        raise ExportError(
            f"verification failed: ONNX Runtime differs from {reference} by {worst:.2e} relative "
            f"(logits {v.max_rel_diff_logits:.2e}, embedding {v.max_rel_diff_embedding:.2e}), "
            f"tolerance {v.tolerance:.0e}"
        )


def report(results: list[BatchResult], v: Verification, *, reference: str = "PyTorch eval") -> str:
    """A small table for the terminal."""
    lines = [
        f"verification on {v.inputs} inputs ({reference} vs ONNX Runtime CPU, "
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
