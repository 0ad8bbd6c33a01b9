"""Tensors on the wire: the protocol's JSON ``data`` and its binary tensor data extension.

A request body is a JSON object, optionally followed by raw tensor bytes; the
``Inference-Header-Content-Length`` header then says where the JSON ends, and each input
sent that way says its size in ``parameters.binary_data_size``, in input order. Numeric
tensors are little-endian, row-major; a BYTES tensor is a sequence of elements, each a
4-byte little-endian length then that many bytes. Responses use the same layout.

This module knows tensors, not models: :mod:`service.v2.inference` decides what a model
accepts.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError
from pydantic_core import to_json

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.v2.schemas import InferRequest, RequestInput

HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES = "BYTES"
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?",
        "UINT8": "u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "INT8": "i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}
"""Numeric datatypes, as their little-endian wire dtype."""
_JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
"""numpy kinds that JSON data may have, by the kind of the declared datatype."""
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Tensor:
    """One decoded input: numeric data as an array of ``shape``, BYTES as bytes objects."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    binary: bool
    """Whether it came in the binary section (BYTES: raw bytes, not JSON strings)."""


def decompress(body: bytes, encoding: str | None, *, limit: int) -> bytes:
    """The body without its ``Content-Encoding`` (gzip or deflate, as tritonclient sends)."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    wbits = _WBITS.get(name)
    if wbits is None:
        raise UnsupportedMediaType(
            f"Content-Encoding {name!r} is not supported; send gzip, deflate or none"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"the {name} request body cannot be decompressed: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLarge(
            f"the decompressed request body exceeds {limit} bytes (the body size limit)"
        )
    if not inflater.eof:
        raise BadRequest(f"the {name} request body is truncated")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(the JSON header, the binary section after it)."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.strip().isdigit():
        raise BadRequest(f"{HEADER_LENGTH} must be a byte count, got {header_length!r}")
    size = int(header_length)
    if size > len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {size} but the body has only {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:size]), view[size:]


def parse_request(header: bytes) -> InferRequest:
    """The inference request object, or a 400 that says which field is wrong."""
    if not header.strip():
        raise BadRequest('the request body is empty; send a JSON object {"inputs": [...]}')
    try:
        return InferRequest.model_validate_json(header)
    except ValidationError as exc:
        message = f"invalid inference request: {validation_message(exc)}"
        if "trailing characters" in message:  # binary data read as part of the JSON
            message += f" (binary data after the JSON needs the {HEADER_LENGTH} header)"
        raise BadRequest(message) from None


def validation_message(exc: ValidationError) -> str:
    """Each problem as 'where: what' (values are left out: they may be huge tensors)."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(problems)


def decode_inputs(inputs: Sequence[RequestInput], binary: memoryview) -> list[Tensor]:
    """Every input as a tensor, taking binary sections in input order."""
    tensors = []
    offset = 0
    for item in inputs:
        reject_shared_memory(item.parameters.extra_keys(), f"input {item.name!r}")
        size = item.parameters.binary_data_size
        if size is None:
            if item.data is None:
                raise BadRequest(f"input {item.name!r} has no 'data' and no binary_data_size")
            tensors.append(_decode_json(item))
            continue
        if item.data is not None:
            raise BadRequest(f"input {item.name!r} has both 'data' and binary_data_size")
        left = len(binary) - offset
        if size > left:
            hint = "" if len(binary) else f" (is the {HEADER_LENGTH} header missing?)"
            raise BadRequest(
                f"input {item.name!r} has binary_data_size {size} but only {left} bytes of "
                f"binary data are left{hint}"
            )
        tensors.append(_decode_binary(item, binary[offset : offset + size]))
        offset += size
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data after the JSON belong to no input "
            "(check binary_data_size and the header length)"
        )
    return tensors


def reject_shared_memory(keys: list[str], what: str) -> None:
    """400 for the shared-memory extension's parameters: tensors travel in the body here."""
    if any(key.startswith("shared_memory") for key in keys):
        raise BadRequest(f"{what}: the shared-memory extension is not supported; send the data")


def _count(item: RequestInput) -> int:
    if item.datatype != BYTES and item.datatype not in DTYPES:
        raise BadRequest(
            f"input {item.name!r} has unknown datatype {item.datatype!r}; "
            f"the protocol's datatypes are {', '.join([*DTYPES, BYTES])}"
        )
    return math.prod(item.shape)


def _decode_binary(item: RequestInput, data: memoryview) -> Tensor:
    count = _count(item)
    shape = tuple(item.shape)
    if item.datatype == BYTES:
        elements = decode_bytes(data, f"input {item.name!r}")
        if len(elements) != count:
            raise BadRequest(
                f"input {item.name!r} has shape {item.shape} ({count} elements) but its "
                f"BYTES data holds {len(elements)}"
            )
        return Tensor(item.name, BYTES, shape, _objects(elements, shape), binary=True)
    wire = DTYPES[item.datatype]
    if len(data) != count * wire.itemsize:
        raise BadRequest(
            f"input {item.name!r}: {item.datatype} {item.shape} takes "
            f"{count * wire.itemsize} bytes, binary_data_size is {len(data)}"
        )
    # astype copies into an aligned array in native byte order (the body may be unaligned).
    array = np.frombuffer(data, dtype=wire).astype(wire.newbyteorder("="))
    return Tensor(item.name, item.datatype, shape, array.reshape(shape), binary=True)


def _decode_json(item: RequestInput) -> Tensor:
    count = _count(item)
    shape = tuple(item.shape)
    try:
        array = np.asarray(item.data, dtype=object if item.datatype == BYTES else None)
    except ValueError as exc:
        raise BadRequest(f"input {item.name!r}: 'data' is not a regular array: {exc}") from None
    if array.ndim > 1 and array.shape != shape:
        raise BadRequest(
            f"input {item.name!r}: nested 'data' has shape {list(array.shape)} but the input's "
            f"shape is {item.shape}; send it flat or nested as the shape"
        )
    if array.size != count:
        raise BadRequest(
            f"input {item.name!r} has shape {item.shape} ({count} elements) but 'data' has "
            f"{array.size}"
        )
    if item.datatype == BYTES:
        flat = array.reshape(-1)
        if not all(isinstance(e, str) for e in flat):
            raise BadRequest(f"input {item.name!r}: BYTES 'data' elements must be strings")
        return Tensor(item.name, BYTES, shape, _objects([e.encode() for e in flat], shape), False)
    dtype = DTYPES[item.datatype].newbyteorder("=")
    if array.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise BadRequest(
            f"input {item.name!r}: {item.datatype} 'data' must be "
            f"{'booleans' if dtype.kind == 'b' else 'numbers'}, got {_what(array)}"
        )
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise BadRequest(f"input {item.name!r}: values out of range for {item.datatype}")
    return Tensor(item.name, item.datatype, shape, array.astype(dtype).reshape(shape), False)


def _what(array: np.ndarray) -> str:
    kinds = {"b": "booleans", "U": "strings", "f": "fractional numbers", "O": "mixed values"}
    return kinds.get(array.dtype.kind, str(array.dtype))


def _objects(elements: Sequence[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)


def decode_bytes(data: memoryview | bytes, what: str) -> list[bytes]:
    """BYTES elements from their wire form: each a 4-byte little-endian length, then data."""
    elements: list[bytes] = []
    offset, end = 0, len(data)
    while offset < end:
        if offset + _LENGTH.size > end:
            raise BadRequest(f"{what}: BYTES data ends inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + length > end:
            raise BadRequest(
                f"{what}: BYTES element {len(elements) + 1} says {length} bytes but only "
                f"{end - offset} are left"
            )
        elements.append(bytes(data[offset : offset + length]))
        offset += length
    return elements


def encode_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements in their wire form (see :func:`decode_bytes`)."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def encode_output(
    name: str, datatype: str, array: np.ndarray, *, binary: bool
) -> tuple[dict[str, object], bytes | None]:
    """(the output's JSON object, its binary section or None when the data is in the JSON).

    ``array`` is numeric in ``datatype``'s dtype, or for BYTES holds ``str`` elements.
    """
    tensor: dict[str, object] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if datatype == BYTES:
        elements = [str(e) for e in array.reshape(-1)]
        if not binary:
            tensor["data"] = elements
            return tensor, None
        raw = encode_bytes([e.encode() for e in elements])
    elif not binary:
        tensor["data"] = array.reshape(-1).tolist()
        return tensor, None
    else:
        raw = np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    return tensor, raw


def encode_response(payload: dict[str, object], sections: Sequence[bytes]) -> tuple[bytes, int]:
    """(the body, the JSON header's length) for a response with binary sections."""
    header = to_json(payload)
    return b"".join([header, *sections]), len(header)
