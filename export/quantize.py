"""Precision variants of an exported model: INT8 for CPUs, FP16 for GPUs, their cost measured.

``python -m export.quantize SOURCE --precision int8|fp16 --out REPO --name NAME`` makes a
new model in the repository with the same contract (``input``, ``logits``, ``embedding``,
all float32) and the same card, plus a ``quantization`` block: how it was made and how
closely it agrees with SOURCE. Needs onnx and onnxruntime only, no PyTorch.

* **int8**: ONNX Runtime's static quantization in the QDQ format, per-channel int8
  weights and uint8 activations (U8S8, the fast kernels on x86 and ARM), calibrated with
  MinMax on images read through the card's own preprocessing. On x86 CPUs without VNNI
  (AVX2, AVX-512 before Cascade Lake) U8S8 can saturate (ONNX Runtime's quantization
  docs), and a model file travels to CPUs other than the one that made it, so weights are
  7-bit (``reduce_range``) by default: correct everywhere, at a small accuracy cost that
  the agreement shows. ``--reduce-range off`` keeps 8-bit weights for serving CPUs known
  to have VNNI (or ARM); the service warns when such a file runs on an x86 CPU without it.
* **fp16**: weights and compute in float16 (``onnxruntime.transformers.float16``), inputs
  and outputs kept float32, so clients and the service do not change. Meant for GPUs: the
  service warns when one runs on the CPU provider.

The agreement is measured on ``--eval DIR`` (an ImageFolder whose folder names are the
card's labels: both models' accuracy and their top-1 agreement) or else on calibration
images held back from calibrating; below ``--min-agreement`` the variant is refused
unless ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export import images
from export import variants as precision_variants
from export.errors import ExportError, configure_logging, failed
from export.repository import ExportResult, add_output_arguments, read_model, target
from service.metadata import (
    INPUT_NAME,
    LOGITS_NAME,
    Agreement,
    ModelCard,
    Quantization,
)

log = logging.getLogger("export.quantize")

CALIBRATION_COUNT = 200
HELD_BACK = 100
MIN_CALIBRATION = 16
MIN_AGREEMENT = 0.97
_BATCH = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export.quantize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, help="a model.onnx exported by this project, or its folder")
    p.add_argument("--precision", required=True, choices=("int8", "fp16"))
    p.add_argument("--calibration", type=Path, metavar="DIR", help="images (int8; recursive)")
    p.add_argument(
        "--count",
        type=int,
        default=CALIBRATION_COUNT,
        help="calibration images drawn from DIR (default: %(default)s)",
    )
    p.add_argument("--eval", type=Path, metavar="DIR", help="ImageFolder to measure accuracy on")
    p.add_argument(
        "--held-back",
        type=int,
        default=HELD_BACK,
        help="without --eval: images of the calibration folder kept out of calibration to "
        "measure agreement on (default: %(default)s)",
    )
    p.add_argument(
        "--reduce-range",
        choices=("on", "off"),
        default="on",
        help="int8: 7-bit weights, correct on x86 CPUs without VNNI too (default: on); off "
        "for serving CPUs with VNNI or ARM",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=MIN_AGREEMENT,
        help="least top-1 agreement with SOURCE (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="write the variant even below it")
    add_output_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(debug=args.debug)
    try:
        result = quantize_model(
            args.source,
            precision=args.precision,
            out=args.out,
            name=args.name,
            version=args.version,
            overwrite=args.overwrite,
            calibration=args.calibration,
            count=args.count,
            eval_dir=args.eval,
            held_back=args.held_back,
            reduce_range=args.reduce_range,
            min_agreement=args.min_agreement,
            force=args.force,
            progress=not args.no_progress,
        )
    except Exception as exc:
        if args.debug:
            raise
        return failed(exc)
    print(f"{result.path}  ({result.card.precision}, version {result.version})")
    return 0


def quantize_model(
    source: Path,
    *,
    precision: str,
    out: Path,
    name: str,
    version: int | None = None,
    overwrite: bool = False,
    calibration: Path | None = None,
    count: int = CALIBRATION_COUNT,
    eval_dir: Path | None = None,
    held_back: int = HELD_BACK,
    reduce_range: str = "on",
    min_agreement: float = MIN_AGREEMENT,
    force: bool = False,
    progress: bool = True,
) -> ExportResult:
    """Write the ``precision`` variant of ``source`` to ``out/name/version/model.onnx``."""
    path, source_bytes, proto, card = _read_source(source)
    if precision not in ("int8", "fp16"):
        raise ExportError(f"unknown precision {precision!r}: choose int8 or fp16")
    if precision == "int8" and calibration is None:
        raise ExportError("--precision int8 needs --calibration DIR: images like those served")
    if count < MIN_CALIBRATION:
        raise ExportError(f"--count must be at least {MIN_CALIBRATION}, got {count}")
    target_dir, version = target(out, name, version, overwrite=overwrite)
    pre = card.preprocessing

    calib = held = None
    if calibration is not None:
        files = images.find_images(calibration, what="--calibration")
        keep_back = 0 if eval_dir is not None else held_back
        drawn = images.sample(files, count + keep_back)
        calib = images.read_rows(drawn[:count], pre, desc="calibration", progress=progress)
        if len(calib.paths) < min(MIN_CALIBRATION, len(drawn[:count])) or not len(calib.paths):
            raise ExportError(
                f"--calibration {calibration}: only {len(calib.paths)} of {len(drawn[:count])} "
                f"images could be read ({calib.skipped} skipped); at least {MIN_CALIBRATION} needed"
            )
        if keep_back and len(drawn) > count:
            held = images.read_rows(drawn[count:], pre, desc="held back", progress=progress)

    with tempfile.TemporaryDirectory() as tmp:
        if calib is not None and precision == "int8":
            made = precision_variants.int8(path, calib.array, Path(tmp), reduce_range=reduce_range)
        else:
            made = precision_variants.fp16(proto)
    variant = made.model
    variant_bytes = variant.SerializeToString()

    agreement = _agreement(source_bytes, variant_bytes, card, eval_dir, held, progress)
    quantization = Quantization(
        precision=precision,  # type: ignore[arg-type]
        source_sha256=hashlib.sha256(source_bytes).hexdigest(),
        calibration_images=len(calib.paths) if calib else None,
        calibration_sha256=calib.sha256 if calib else None,
        onnxruntime_version=ort.__version__,
        agreement=agreement,
        method=made.method,
        format=made.format,
        reduce_range=made.reduce_range,
    )
    report = _report(path, precision, quantization)
    log.info("%s", report)
    if agreement.top1_agreement < min_agreement and not force:
        raise ExportError(
            f"the {precision} variant agrees with {path} on {agreement.top1_agreement:.2%} of "
            f"{agreement.images} images, under --min-agreement {min_agreement:.2%}; nothing "
            "written (--force writes it anyway)"
        )
    new_card = card.model_copy(update={"quantization": quantization})
    del variant.metadata_props[:]
    onnx.helper.set_model_props(variant, new_card.to_metadata_props())
    target_dir.mkdir(parents=True, exist_ok=True)
    written = target_dir / "model.onnx"
    onnx.save(variant, str(written))
    log.info("wrote %s (%.1f MB)", written, written.stat().st_size / 1e6)
    return ExportResult(path=written, version=version, card=new_card, report=report)


def _read_source(path: Path) -> tuple[Path, bytes, onnx.ModelProto, ModelCard]:
    """The source file's path, bytes (hashed, and run for the agreement), graph and card."""
    path, data, proto, card = read_model(path)
    if card.quantization is not None:
        raise ExportError(
            f"{path} is already a {card.precision} variant; quantize its fp32 source "
            f"(sha256 {card.quantization.source_sha256[:12]}...)"
        )
    return path, data, proto, card


def _agreement(
    source: bytes,
    variant: bytes,
    card: ModelCard,
    eval_dir: Path | None,
    held: images.Rows | None,
    progress: bool,
) -> Agreement:
    """Both models on the same rows: top-1 agreement, logit errors, and accuracy if labelled."""
    truth = None
    if eval_dir is not None:
        files = images.find_images(eval_dir, what="--eval")
        rows = images.read_rows(files, card.preprocessing, desc="evaluate", progress=progress)
        names = [images.class_of(p, eval_dir) for p in rows.paths]
        unknown = sorted(set(names) - set(card.labels))
        if unknown:
            raise ExportError(
                f"--eval {eval_dir}: folders {', '.join(unknown[:5])} are not labels of the "
                f"model ({', '.join(card.labels[:5])}, ...)"
            )
        truth = np.array([card.labels.index(n) for n in names])
        on = f"--eval {eval_dir.name}"
    elif held is not None and len(held.paths):
        rows, on = held, "calibration images held back"
    else:
        raise ExportError(
            "nothing to measure the agreement on: give --eval DIR, or a --calibration folder "
            "with more images than --count (the rest are held back)"
        )
    reference = _logits(source, rows.array)
    logits = _logits(variant, rows.array)
    error = np.abs(reference - logits)
    return Agreement(
        on=on,
        images=len(rows.paths),
        top1_agreement=float(np.mean(reference.argmax(1) == logits.argmax(1))),
        max_abs_logit_error=float(error.max()),
        mean_abs_logit_error=float(error.mean()),
        source_accuracy=None if truth is None else float(np.mean(reference.argmax(1) == truth)),
        accuracy=None if truth is None else float(np.mean(logits.argmax(1) == truth)),
    )


def _logits(model: bytes, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    parts = [
        session.run([LOGITS_NAME], {INPUT_NAME: rows[i : i + _BATCH]})[0]
        for i in range(0, len(rows), _BATCH)
    ]
    return np.concatenate(parts)


def _report(path: Path, precision: str, q: Quantization) -> str:
    a = q.agreement
    lines = [
        f"{precision} variant of {path}: {q.format}",
        f"  agreement on {a.images} images ({a.on}): top-1 {a.top1_agreement:.2%}, "
        f"logit error max {a.max_abs_logit_error:.3g} mean {a.mean_abs_logit_error:.3g}",
    ]
    if a.accuracy is not None and a.source_accuracy is not None:
        lines.append(
            f"  accuracy: {a.accuracy:.2%} ({precision}) vs {a.source_accuracy:.2%} (source), "
            f"{100 * (a.accuracy - a.source_accuracy):+.2f} points"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
