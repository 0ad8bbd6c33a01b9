"""A v2 inference request against one of our models: inputs -> batcher rows -> outputs.

A request carries exactly one input: ``input``, FP32 [N, 3, H, W] already preprocessed,
whose rows go straight to the model's batcher; or ``image``, BYTES [N], encoded image
files that go through the same decode and preprocessing as /predict first. Either way the
rows join the same queue as /predict's. Outputs are ``logits``, ``probabilities`` and
``embedding`` (FP32 [N, ...]); the classification extension turns a class output into
BYTES [N, k] elements ``"<value>:<index>:<label>"``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from fastapi import Request

from service.batcher import Outputs
from service.dataplane import DataPlane
from service.errors import BadRequest, ServiceError
from service.metadata import (
    INPUT_NAME,
    LOGITS_NAME,
    OUTPUT_NAMES,
    PROBABILITIES_NAME,
)
from service.postprocess import top_predictions
from service.registry import Loaded, ServedModel
from service.v2.codec import BYTES, Tensor, encode_output, reject_shared_memory
from service.v2.schemas import InferRequest

IMAGE_NAME = "image"
CLASS_OUTPUTS = (LOGITS_NAME, PROBABILITIES_NAME)
FP32 = "FP32"


@dataclass(frozen=True)
class OutputSpec:
    """One output to return, and how."""

    name: str
    binary: bool
    classification: int | None = None


def output_specs(request: InferRequest, served: ServedModel, loaded: Loaded) -> list[OutputSpec]:
    """The outputs asked for (all by default), checked before anything runs."""
    default_binary = request.parameters.binary_data_output
    if request.outputs is None:
        return [OutputSpec(name, default_binary) for name in OUTPUT_NAMES]
    num_classes = loaded.engine.num_classes
    specs = []
    for output in request.outputs:
        params = output.parameters
        if output.name not in OUTPUT_NAMES:
            raise BadRequest(
                f"unknown output {output.name!r}; model {served.name!r} has outputs "
                + ", ".join(repr(n) for n in OUTPUT_NAMES)
            )
        reject_shared_memory(params.extra_keys(), f"output {output.name!r}")
        k = params.classification
        if k is not None and output.name not in CLASS_OUTPUTS:
            raise BadRequest(
                f"classification needs a class output ({', '.join(CLASS_OUTPUTS)}), "
                f"not {output.name!r}"
            )
        if k is not None and k > num_classes:
            raise BadRequest(
                f"output {output.name!r}: classification must be between 1 and {num_classes} "
                f"(the classes of model {served.name!r}), got {k}"
            )
        binary = default_binary if params.binary_data is None else params.binary_data
        specs.append(OutputSpec(output.name, binary, k))
    if len({s.name for s in specs}) != len(specs):
        raise BadRequest("each output may be requested once")
    return specs


def single_input(tensors: Sequence[Tensor], loaded: Loaded) -> Tensor:
    """The one input of the request, with its datatype and shape checked against the model."""
    size = loaded.engine.input_size
    expected = {
        INPUT_NAME: f"{FP32} [N, 3, {size}, {size}] (preprocessed)",
        IMAGE_NAME: f"{BYTES} [N] (encoded image files)",
    }
    allowed = " or ".join(f"{name!r}, {what}" for name, what in expected.items())
    if len(tensors) != 1 or tensors[0].name not in expected:
        names = ", ".join(repr(t.name) for t in tensors)
        raise BadRequest(f"send exactly one input, {allowed}; got {names}")
    tensor = tensors[0]
    if tensor.name == INPUT_NAME:
        ok = tensor.datatype == FP32 and tensor.shape[1:] == (3, size, size)
        ok = ok and len(tensor.shape) == 4
    else:  # [N, 1] too: what clients send when they follow the config's dims [1]
        ok = (
            tensor.datatype == BYTES
            and len(tensor.shape) in (1, 2)
            and tensor.shape[1:] in ((), (1,))
        )
    if not ok:
        raise BadRequest(
            f"input {tensor.name!r} must be {expected[tensor.name]}, "
            f"got {tensor.datatype} {list(tensor.shape)}"
        )
    if tensor.shape[0] == 0:
        raise BadRequest(f"input {tensor.name!r} is empty: the batch dimension is 0")
    return tensor


async def run(
    request: Request, served: ServedModel, dataplane: DataPlane, tensor: Tensor
) -> list[Outputs]:
    """Each row's outputs, through the data plane (the same queue as /predict)."""
    rows = tensor.shape[0]
    dataplane.check_count(rows, f"a batch of {rows}")
    if tensor.name == INPUT_NAME:
        return await dataplane.run_rows(request, served, list(tensor.data))
    files = [(f"input 'image' element {i + 1}", _image_bytes(tensor, i)) for i in range(rows)]
    try:
        return await dataplane.run_images(request, served, files)
    except ServiceError as exc:
        # An image that cannot be decoded is bad data: the protocol's 400, not 415/422.
        if exc.status in (415, 422):
            raise exc.with_status(400) from None
        raise


def _image_bytes(tensor: Tensor, index: int) -> bytes:
    element: bytes = tensor.data.reshape(-1)[index]
    if tensor.binary:
        return element
    try:  # JSON cannot carry raw bytes: an image in JSON data is base64 text
        return base64.b64decode(element, validate=True)
    except binascii.Error:
        raise BadRequest(
            f"input 'image' element {index + 1} is not valid base64; in JSON 'data' an image "
            "is base64 text (or send raw bytes with the binary data extension)"
        ) from None


def encode_outputs(
    rows: Sequence[Outputs], specs: Sequence[OutputSpec], labels: Sequence[str]
) -> tuple[list[dict[str, object]], list[bytes]]:
    """(the response's output objects, the binary sections in the same order)."""
    tensors, sections = [], []
    for spec in specs:
        values = np.stack([row[spec.name] for row in rows])
        if spec.classification is None:
            tensor, raw = encode_output(spec.name, FP32, values, binary=spec.binary)
        else:
            classes = np.array(
                [
                    [_class_string(p) for p in top_predictions(v, spec.classification, labels)]
                    for v in values
                ],
                dtype=object,
            )
            tensor, raw = encode_output(spec.name, BYTES, classes, binary=spec.binary)
        tensors.append(tensor)
        if raw is not None:
            sections.append(raw)
    return tensors, sections


def _class_string(prediction: dict[str, object]) -> str:
    # The shortest text that reads back as the same float32 (Triton prints 6 decimals).
    value = np.float32(prediction["score"])  # type: ignore[arg-type]
    return f"{value!s}:{prediction['index']}:{prediction['label']}"
