"""The v2 tensor codec against the official client's own encoder and decoder.

tritonclient builds request bodies (``generate_request_body``) and parses response bodies
(``InferResult.from_response_body``) offline, so the wire format is checked both ways
without a server; the end-to-end tests then do it over HTTP.
"""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import pytest
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput, InferResult
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from service.errors import BadRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType
from service.v2.codec import (
    decode_bytes,
    decode_inputs,
    decompress,
    encode_bytes,
    encode_output,
    encode_response,
    parse_request,
    split_body,
)

RNG = np.random.default_rng(7)
IMAGE = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4) / 7 - 3


def client_body(*inputs: InferInput, **kwargs: object) -> tuple[bytes, str | None]:
    """A request body as tritonclient sends it, and its header-length header (or None)."""
    body, json_size = InferenceServerClient.generate_request_body(list(inputs), **kwargs)
    return body, None if json_size is None else str(json_size)


def decode(body: bytes, header_length: str | None) -> dict:
    header, binary = split_body(body, header_length)
    request = parse_request(header)
    return {t.name: t for t in decode_inputs(request.inputs, binary)}


def fp32_input(name: str, array: np.ndarray, *, binary: bool) -> InferInput:
    return InferInput(name, list(array.shape), "FP32").set_data_from_numpy(
        array, binary_data=binary
    )


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_client_fp32_input_decodes_to_the_same_array(binary: bool) -> None:
    body, length = client_body(fp32_input("input", IMAGE, binary=binary))
    assert (length is not None) == binary
    tensor = decode(body, length)["input"]
    assert (tensor.datatype, tensor.shape, tensor.binary) == ("FP32", (2, 3, 4, 4), binary)
    assert tensor.data.dtype == np.float32 and tensor.data.flags.aligned
    np.testing.assert_array_equal(tensor.data, IMAGE)


def test_several_binary_inputs_are_cut_in_order() -> None:
    files = np.array([b"\xff\xd8jpeg", b"", b"\x89PNG\r\n"], dtype=object)
    first = InferInput("image", [3], "BYTES").set_data_from_numpy(files)
    second = fp32_input("input", IMAGE[:1], binary=True)
    tensors = decode(*client_body(first, second))
    assert list(tensors["image"].data) == [b"\xff\xd8jpeg", b"", b"\x89PNG\r\n"]
    np.testing.assert_array_equal(tensors["input"].data, IMAGE[:1])


def test_json_bytes_are_utf8_strings() -> None:
    text = np.array([["caf\u00e9"], ["YWJj"]], dtype=object)
    tensor = decode(
        *client_body(
            InferInput("image", [2, 1], "BYTES").set_data_from_numpy(text, binary_data=False)
        )
    )["image"]
    assert (tensor.shape, tensor.binary) == ((2, 1), False)
    assert tensor.data.tolist() == [["caf\u00e9".encode()], [b"YWJj"]]


def test_nested_json_data_equals_flat() -> None:
    x = '{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": %s}'
    for data in ("[[1, 2], [3, 4]]", "[1, 2, 3, 4]"):
        tensor = decode(_json(x % data), None)["x"]
        assert tensor.data.dtype == np.int32
        assert tensor.data.tolist() == [[1, 2], [3, 4]]


def test_bytes_wire_format_matches_tritonclient() -> None:
    elements = [b"", b"a", bytes(range(256)) * 3]
    ours = encode_bytes(elements)
    assert ours == serialize_byte_tensor(np.array(elements, dtype=object)).item()
    assert ours[:4] == b"\x00\x00\x00\x00" and ours[4:9] == b"\x01\x00\x00\x00a"
    assert decode_bytes(ours, "x") == elements
    assert deserialize_bytes_tensor(ours).tolist() == elements


def test_response_with_binary_and_json_outputs_reads_back_in_tritonclient() -> None:
    logits = RNG.standard_normal((3, 10), dtype=np.float32)
    classes = np.array([["0.5:3:cat"], ["0.25:1:car"], ["0.125:0:plane"]], dtype=object)
    tensors, sections = [], []
    for name, datatype, array, binary in [
        ("logits", "FP32", logits, True),
        ("probabilities", "BYTES", classes, True),
        ("embedding", "FP32", logits[:, :4], False),
    ]:
        tensor, raw = encode_output(name, datatype, array, binary=binary)
        tensors.append(tensor)
        if raw is not None:
            sections.append(raw)
    assert tensors[0]["parameters"] == {"binary_data_size": 3 * 10 * 4}
    body, length = encode_response(
        {"model_name": "m", "model_version": "1", "outputs": tensors}, sections
    )
    result = InferResult.from_response_body(body, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    np.testing.assert_array_equal(result.as_numpy("embedding"), logits[:, :4])
    assert result.as_numpy("probabilities").tolist() == [
        [b"0.5:3:cat"],
        [b"0.25:1:car"],
        [b"0.125:0:plane"],
    ]
    assert result.get_response()["model_version"] == "1"


def test_requested_outputs_parse_with_their_parameters() -> None:
    body, length = client_body(
        fp32_input("input", IMAGE, binary=False),
        outputs=[
            InferRequestedOutput("probabilities", binary_data=False, class_count=3),
            InferRequestedOutput("embedding"),
        ],
        request_id="req-7",
    )
    request = parse_request(split_body(body, length)[0])
    assert request.id == "req-7"
    assert request.outputs is not None
    first, second = request.outputs
    assert (first.name, first.parameters.binary_data, first.parameters.classification) == (
        "probabilities",
        False,
        3,
    )
    assert (second.parameters.binary_data, second.parameters.classification) == (True, None)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_as_tritonclient_sends_them(encoding: str) -> None:
    body, _ = client_body(fp32_input("input", IMAGE, binary=True))
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    assert decompress(packed, encoding, limit=len(body)) == body
    with pytest.raises(PayloadTooLarge, match=f"exceeds {len(body) - 1} bytes"):
        decompress(packed, encoding, limit=len(body) - 1)
    with pytest.raises(BadRequest, match="truncated"):
        decompress(packed[:-8], encoding, limit=len(body))


def test_unknown_content_encoding_is_415() -> None:
    with pytest.raises(UnsupportedMediaType, match="'br' is not supported"):
        decompress(b"x", "br", limit=10)


def _json(inputs: str) -> bytes:
    return b'{"inputs": [' + inputs.encode() + b"]}"


X = '{"name": "x", "shape": [2], "datatype": "FP32"'


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"", None, "the request body is empty"),
        (b"{not json", None, "invalid inference request: Invalid JSON"),
        (b'{"inputs": []}', None, "inputs: List should have at least 1 item"),
        (
            _json('{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}'),
            None,
            "inputs.0.shape.0",
        ),
        (_json(X + "}"), None, "input 'x' has no 'data' and no binary_data_size"),
        (_json(X + ', "data": [1, 2, 3]}'), None, "(2 elements) but 'data' has 3"),
        (_json(X + ', "data": [[1], [2, 3]]}'), None, "'data' is not a regular array"),
        (_json(X + ', "data": ["1", "2"]}'), None, "FP32 'data' must be numbers, got strings"),
        (_json(X + ', "data": [true, false]}'), None, "must be numbers, got booleans"),
        (
            _json('{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 300]}'),
            None,
            "out of range for INT8",
        ),
        (
            _json('{"name": "x", "shape": [2], "datatype": "INT32", "data": [1.5, 2]}'),
            None,
            "got fractional numbers",
        ),
        (
            _json('{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [[1], [2]]}'),
            None,
            "nested 'data' has shape [2, 1]",
        ),
        (
            _json('{"name": "x", "shape": [1], "datatype": "FP128", "data": [1]}'),
            None,
            "unknown datatype 'FP128'",
        ),
        (
            _json('{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}'),
            None,
            "BYTES 'data' elements must be strings",
        ),
        (
            _json(X + ', "parameters": {"binary_data_size": 8}}'),
            None,
            "is the Inference-Header-Content-Length header missing?",
        ),
        (
            _json(X + ', "parameters": {"binary_data_size": 8}, "data": [1, 2]}'),
            None,
            "both 'data' and binary_data_size",
        ),
        (
            _json(X + ', "parameters": {"shared_memory_region": "r"}}'),
            None,
            "shared-memory extension is not supported",
        ),
        (
            _json(X + ', "parameters": {"binary_data_size": 8}}') + bytes(8),
            None,
            "binary data after the JSON needs the Inference-Header-Content-Length header",
        ),
        (b"{}", "abc", "must be a byte count, got 'abc'"),
        (b"{}", "9", "is 9 but the body has only 2 bytes"),
    ],
)
def test_malformed_requests_are_400_with_a_reason(
    body: bytes, header_length: str | None, message: str
) -> None:
    with pytest.raises(ServiceError) as caught:
        decode(body, header_length)
    assert caught.value.status == 400
    assert message in caught.value.message


B = '{"name": "b", "shape": [%d], "datatype": "BYTES", "parameters": {"binary_data_size": %d}}'


def _binary(inputs: str, data: bytes) -> tuple[bytes, str]:
    header = _json(inputs)
    return header + data, str(len(header))


@pytest.mark.parametrize(
    ("inputs", "data", "message"),
    [
        (
            X + ', "parameters": {"binary_data_size": 4}}',
            b"\0" * 4,
            "FP32 [2] takes 8 bytes, binary_data_size is 4",
        ),
        (
            X + ', "parameters": {"binary_data_size": 8}}',
            b"\0" * 12,
            "4 bytes of binary data after the JSON belong to no input",
        ),
        (
            X + ', "parameters": {"binary_data_size": 8}}',
            b"\0" * 6,
            "binary_data_size 8 but only 6 bytes",
        ),
        (
            B % (2, 6),
            encode_bytes([b"ab"]),
            "(2 elements) but its BYTES data holds 1",
        ),
        (
            B % (1, 6),
            b"\x09\0\0\0ab",
            "element 1 says 9 bytes but only 2 are left",
        ),
        (
            B % (1, 2),
            b"\x01\0",
            "ends inside an element's 4-byte length",
        ),
    ],
)
def test_bad_binary_sections_are_400(inputs: str, data: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=None) as caught:
        decode(*_binary(inputs, data))
    assert message in caught.value.message
