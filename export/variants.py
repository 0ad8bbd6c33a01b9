"""How precision variants are made, with ONNX Runtime's own tools (see export.quantize)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from export.errors import ExportError
from service.engine import has_vnni
from service.metadata import INPUT_NAME

log = logging.getLogger("export.quantize")

_BATCH = 32
"""Calibration rows per ONNX Runtime run."""


class Made(NamedTuple):
    """A variant and how it was made (the card's words)."""

    model: onnx.ModelProto
    method: str
    format: str
    reduce_range: bool | None = None


def int8(path: Path, rows: np.ndarray, tmp: Path, *, reduce_range: str = "on") -> Made:
    """Static QDQ quantization of ``path``, calibrated on ``rows`` (files go to ``tmp``)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if reduce_range not in ("on", "off"):
        raise ExportError(f"--reduce-range is on or off, got {reduce_range!r}")
    reduce = reduce_range == "on"
    if not reduce and has_vnni() is False:
        log.warning(
            "int8 with 8-bit weights on a CPU without VNNI: U8S8 may saturate here; "
            "the agreement below shows what it costs on this CPU"
        )

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(rows), _BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            return None if start is None else {INPUT_NAME: rows[start : start + _BATCH]}

    prepared, quantized = tmp / "prepared.onnx", tmp / "int8.onnx"
    quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(quantized),
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return Made(
        onnx.load(str(quantized)),
        method="static quantization, MinMax calibration (onnxruntime.quantization)",
        format="QDQ, per-channel int8 weights"
        + (" (7-bit range)" if reduce else "")
        + ", uint8 activations (U8S8)",
        reduce_range=reduce,
    )


def fp16(proto: onnx.ModelProto) -> Made:
    """float16 weights and compute; inputs and outputs stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return Made(
        convert_float_to_float16(proto, keep_io_types=True),
        method="float16 conversion (onnxruntime.transformers.float16)",
        format="float16 weights and compute, float32 inputs and outputs",
    )
