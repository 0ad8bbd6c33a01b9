"""The protocol's error cases over HTTP, each with its status and a ``{"error": "..."}`` body.

Most are provoked through tritonclient (it raises ``InferenceServerException`` with the
status and the server's message); the few that tritonclient cannot produce (malformed
JSON, inconsistent binary sections, unknown paths) are sent raw with httpx.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from e2e_server import BATCHED, Server, metric
from PIL import Image
from tritonclient.utils import InferenceServerException

MODEL = "cifar10-resnet20"
INFER = f"/v2/models/{MODEL}/infer"

Client = triton.InferenceServerClient


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    with triton.InferenceServerClient(urlsplit(server.url).netloc, network_timeout=60) as c:
        yield c


def fp32(name: str, shape: list[int], datatype: str = "FP32") -> triton.InferInput:
    dtype = np.float64 if datatype == "FP64" else np.float32
    return triton.InferInput(name, shape, datatype).set_data_from_numpy(np.zeros(shape, dtype))


def files(*data: bytes, binary: bool = True) -> triton.InferInput:
    array = np.array(list(data), dtype=object)
    return triton.InferInput("image", [len(data)], "BYTES").set_data_from_numpy(
        array, binary_data=binary
    )


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


IMAGE = fp32("input", [1, 3, 32, 32])
Call = Callable[[Client], object]


def out(name: str, k: int = 0) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, class_count=k)]


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        (lambda c: c.infer("nope", [IMAGE]), 404, "unknown model 'nope'; served models: "),
        (lambda c: c.infer(MODEL, [IMAGE], "9"), 404, "model 'cifar10-resnet20' has no version 9"),
        (lambda c: c.infer(MODEL, [IMAGE], "abc"), 404, "has no version 'abc'"),
        (lambda c: c.get_model_metadata("nope"), 404, "unknown model 'nope'"),
        (lambda c: c.get_model_config(MODEL, "7"), 404, "has no version 7; versions: 1"),
        (
            lambda c: c.infer(MODEL, [fp32("input", [1, 3, 31, 31])]),
            400,
            "input 'input' must be FP32 [N, 3, 32, 32] (preprocessed), got FP32 [1, 3, 31, 31]",
        ),
        (
            lambda c: c.infer(MODEL, [fp32("input", [1, 3, 32, 32], "FP64")]),
            400,
            "got FP64 [1, 3, 32, 32]",
        ),
        (
            lambda c: c.infer(MODEL, [fp32("pixels", [1, 3, 32, 32])]),
            400,
            "send exactly one input, 'input', FP32 [N, 3, 32, 32] (preprocessed) or 'image', "
            "BYTES [N] (encoded image files); got 'pixels'",
        ),
        (
            lambda c: c.infer(MODEL, [IMAGE, files(png())]),
            400,
            "send exactly one input",
        ),
        (lambda c: c.infer(MODEL, [fp32("input", [0, 3, 32, 32])]), 400, "is empty"),
        (
            lambda c: c.infer(MODEL, [IMAGE], outputs=out("features")),
            400,
            "unknown output 'features'; model 'cifar10-resnet20' has outputs 'logits', "
            "'probabilities', 'embedding'",
        ),
        (
            lambda c: c.infer(MODEL, [IMAGE], outputs=out("embedding", 3)),
            400,
            "classification needs a class output (logits, probabilities), not 'embedding'",
        ),
        (
            lambda c: c.infer(MODEL, [IMAGE], outputs=out("probabilities", 11)),
            400,
            "classification must be between 1 and 10",
        ),
        (
            lambda c: c.infer(MODEL, [files(png(), png()[:60])]),
            400,
            "input 'image' element 2 of 2: the PNG data is corrupt or truncated",
        ),
        (
            lambda c: c.infer(MODEL, [files(b"hello world")]),
            400,
            "not an image format the service can read",
        ),
        (
            lambda c: c.infer(MODEL, [files(b"not base64!", binary=False)]),
            400,
            "input 'image' element 1 is not valid base64",
        ),
        (
            lambda c: c.infer(BATCHED, [fp32("input", [17, 3, 32, 32])]),
            503,
            "images queued (limit 16); retry shortly",
        ),
        (
            lambda c: c.infer(MODEL, [fp32("input", [65, 3, 32, 32])]),
            413,
            "a batch of 65; at most 64 per request",
        ),
    ],
    ids=[
        "unknown-model",
        "unknown-version",
        "non-numeric-version",
        "metadata-unknown-model",
        "config-unknown-version",
        "bad-shape",
        "bad-datatype",
        "unknown-input",
        "two-inputs",
        "empty-batch",
        "unknown-output",
        "classify-embedding",
        "classify-too-many",
        "corrupt-image",
        "not-an-image",
        "bad-base64",
        "queue-full",
        "batch-over-limit",
    ],
)
def test_errors_through_tritonclient(client: Client, call: Call, status: int, message: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(client)
    assert caught.value.status() == str(status)
    assert message in caught.value.message()


def _header(json_text: str) -> dict[str, str]:
    return {"Inference-Header-Content-Length": str(len(json_text))}


X = '{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32"%s}]}'
BINARY = X % ', "parameters": {"binary_data_size": 12288}'


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "message"),
    [
        ("POST", INFER, {"content": b"{not json"}, 400, "invalid inference request: Invalid JSON"),
        ("POST", INFER, {"content": b""}, 400, "the request body is empty"),
        (
            "POST",
            INFER,
            {"content": (X % ', "data": [1, 2]').encode()},
            400,
            "input 'input' has shape [1, 3, 32, 32] (3072 elements) but 'data' has 2",
        ),
        (
            "POST",
            INFER,
            {"content": BINARY.encode() + bytes(100), "headers": _header(BINARY)},
            400,
            "binary_data_size 12288 but only 100 bytes of binary data are left",
        ),
        (
            "POST",
            INFER,
            {"content": BINARY.encode() + bytes(12288)},
            400,
            "binary data after the JSON needs the Inference-Header-Content-Length header",
        ),
        (
            "POST",
            INFER,
            {"content": b"{}", "headers": {"Content-Encoding": "br"}},
            415,
            "Content-Encoding 'br' is not supported",
        ),
        ("GET", "/v2/models/nope/ready", {}, 404, "unknown model 'nope'"),
        ("GET", "/v2/nowhere", {}, 404, "Not Found"),
        ("GET", INFER, {}, 405, "Method Not Allowed"),
    ],
    ids=[
        "malformed-json",
        "empty-body",
        "data-count",
        "binary-size",
        "no-header-length",
        "content-encoding",
        "model-ready-unknown",
        "unknown-path",
        "wrong-method",
    ],
)
def test_raw_requests_get_the_protocol_error_body(
    server: Server, method: str, path: str, kwargs: dict, status: int, message: str
) -> None:
    response = httpx.request(method, server.url + path, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    assert message in body["error"]


def test_queue_full_says_when_to_retry_and_is_counted(server: Server) -> None:
    rows = np.zeros((17, 3, 32, 32), np.float32)
    header = '{"inputs": [{"name": "input", "shape": [17, 3, 32, 32], "datatype": "FP32", '
    header += f'"parameters": {{"binary_data_size": {rows.nbytes}}}}}]}}'
    labels = {"route": "/v2/models/{model}/infer", "model": BATCHED, "code": "overloaded"}
    with server.client() as http_client:
        before = metric(http_client, "resnet_serve_errors_total", **labels)
        response = http_client.post(
            f"/v2/models/{BATCHED}/infer",
            content=header.encode() + rows.tobytes(),
            headers=_header(header),
        )
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert metric(http_client, "resnet_serve_errors_total", **labels) == before + 1


def test_the_rest_of_the_service_keeps_its_error_body(server: Server) -> None:
    response = httpx.get(server.url + "/models/nope", timeout=30)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
