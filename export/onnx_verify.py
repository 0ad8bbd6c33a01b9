"""An adopted ONNX file proves itself against the original file, with ONNX Runtime only.

The counterpart of :mod:`export.verify` (PyTorch vs ONNX Runtime) for adopted files: both
graphs run on the same inputs at each batch size, and the figures and the tolerance are
:mod:`export.agreement`'s. Inputs are uniform-noise pixels normalized as the card says, or
a folder's images preprocessed exactly as the service does (:class:`Preprocessor`).
Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export import agreement
from export.errors import ExportError
from export.images import verification_rows
from export.onnx_graph import Head, with_outputs
from service.metadata import EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME, Preprocessing, Verification

REFERENCE = "the original ONNX file"
Figures = tuple[list[agreement.BatchResult], Verification]
"""Each batch size's figures, and their worst as the card stores them."""
_MAX_PIXELS = 1 << 30  # verification images are the user's own files: no request limit


class Original:
    """The original file, computing what it always did, with its logits and embedding exposed.

    A file with a fixed batch size is run in chunks of that size (the last one padded), so
    that it is the reference at every batch size the adopted file is checked at.
    """

    def __init__(self, proto: onnx.ModelProto, head: Head) -> None:
        self.head = head
        self.session = session(with_outputs(proto, (head.logits, head.embedding)), REFERENCE)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        head = self.head
        step = head.batch or len(x)
        logits, embedding = [], []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            n = len(chunk)
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], step - n, axis=0)])
            try:
                a, b = self.session.run([head.logits, head.embedding], {head.input: chunk})
            except Exception as exc:  # ORT's own exception types
                why = first_line(exc)
                raise ExportError(f"{REFERENCE} fails on a batch of {step}: {why}") from exc
            logits.append(a[:n])
            embedding.append(b[:n])
        return np.concatenate(logits), np.concatenate(embedding)


def compare(
    adopted: onnx.ModelProto,
    original: Original,
    images: np.ndarray,
    batch_sizes: Sequence[int],
    *,
    inputs: str,
    tolerance: float,
) -> Figures:
    """The adopted graph against the original at each batch size; raises if they differ."""
    adopted_session = session(adopted, "the adopted graph")
    results = []
    for b in batch_sizes:
        x = images[:b]
        want = original.run(x)
        try:
            got = adopted_session.run([LOGITS_NAME, EMBEDDING_NAME], {INPUT_NAME: x})
        except Exception as exc:  # ORT's own exception types
            raise ExportError(f"the adopted graph fails at batch {b}: {first_line(exc)}") from exc
        if [g.shape for g in got] != [w.shape for w in want]:
            shapes = [list(g.shape) for g in got]
            raise ExportError(f"the adopted graph gives shapes {shapes} at batch {b}")
        (abs_l, rel_l), (abs_e, rel_e) = map(agreement.diff, want, got)
        top1 = float(np.mean(want[0].argmax(1) == got[0].argmax(1)))
        results.append(agreement.BatchResult(b, abs_l, rel_l, abs_e, rel_e, top1))
    figures = agreement.summarize(results, inputs=inputs, tolerance=tolerance)
    agreement.check(figures, reference=REFERENCE)
    return results, figures


def inputs(folder: Path | str | None, n: int, pre: Preprocessing) -> tuple[np.ndarray, str]:
    """``n`` inputs and what they are: random pixels, or the folder's images as served."""
    if folder is None:
        pixels = np.random.default_rng(0).random((n, 3, pre.crop, pre.crop), dtype=np.float32)
        mean = np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)
        return (pixels - mean) / std, "random"
    folder = Path(folder)
    return verification_rows(folder, n, pre, max_pixels=_MAX_PIXELS), str(folder)


def session(proto: onnx.ModelProto, what: str) -> ort.InferenceSession:
    """A CPU session for ``proto``; ``what`` names it in the error when ORT refuses it."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failed run is reported once, by the ExportError it raises
    try:
        return ort.InferenceSession(
            proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT's own exception types
        raise ExportError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (ORT's run to many lines)."""
    return next(
        (line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__
    )
