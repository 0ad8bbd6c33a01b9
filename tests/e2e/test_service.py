"""Health, readiness, model listing, metrics, error bodies, OpenAPI and SIGTERM, over HTTP."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from e2e_server import BATCHED, Server, metric, wait_for
from PIL import Image

from export.labels import CIFAR10_CLASSES


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


CIFAR_LABELS = list(CIFAR10_CLASSES)


def test_readyz_is_503_until_the_model_is_loaded_and_warm(
    launch: Callable[..., Server], tmp_path: Path, cifar_model_file: Path
) -> None:
    """The model file is a named pipe: loading blocks until the test writes the model."""
    (tmp_path / "slow" / "1").mkdir(parents=True)
    pipe = tmp_path / "slow" / "1" / "model.onnx"
    os.mkfifo(pipe)
    server = launch(tmp_path, ready=False)  # answers /healthz while the model loads
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json() == {
            "ready": False,
            "reason": "slow v1: loading",
            "models": {"slow/1": "loading"},
        }
        refused = client.post("/predict", content=b"\xff\xd8")
        assert refused.status_code == 503
        assert refused.json()["error"] == {
            "code": "model_not_ready",
            "message": "model 'slow' version 1 is loading",
        }
        writer = threading.Thread(target=pipe.write_bytes, args=(cifar_model_file.read_bytes(),))
        writer.start()
        wait_for(lambda: client.get("/readyz").status_code == 200, "/readyz 200", timeout=60)
        writer.join()
        assert client.get("/readyz").json() == {
            "ready": True,
            "reason": "all models are ready",
            "models": {"slow/1": "ready"},
        }
    assert server.stop() == 0  # SIGTERM: a clean exit


def test_empty_repository_starts_and_says_why_not_ready(
    launch: Callable[..., Server], tmp_path: Path
) -> None:
    server = launch(tmp_path, ready=False)
    with server.client() as client:
        wait_for(lambda: "scanning" not in client.get("/readyz").text, "the scan")
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["reason"] == (
            f"no models found under {tmp_path} (expected {tmp_path}/<name>/<version>/model.onnx)"
        )
        assert client.get("/models").json() == {"models": []}
        assert client.post("/predict", content=b"x").json()["error"]["code"] == "model_not_ready"
    assert "no models found under" in server.log.read_text()


def test_models_describe_what_is_served(server: Server, cifar_model_file: Path) -> None:
    with server.client() as client:
        listing = client.get("/models").json()["models"]
        one = client.get("/models/cifar10-resnet20").json()
        missing = client.get("/models/nope")
    assert [m["name"] for m in listing] == [BATCHED, "cifar10-resnet20"]
    assert [m["default"] for m in listing] == [False, True]
    batched = listing[0]["versions"][0]
    assert batched["batching"] == {
        "max_batch_size": 4,
        "max_delay_ms": 5000.0,
        "max_queue_size": 16,
        "instances": 1,
    }
    version = one["versions"][0]
    assert (version["version"], version["state"], version["provider"]) == (
        1,
        "ready",
        "CPUExecutionProvider",
    )
    assert (version["input_size"], version["num_classes"], version["embedding_dim"]) == (32, 10, 64)
    assert version["preprocessing"]["resize"] == 32 and version["arch"] == "cifar-resnet20"
    assert version["test_time_augmentation"] == "none"
    assert version["batching"]["max_batch_size"] == 32  # the service default
    assert one["labels"] == CIFAR_LABELS and one["latest_version"] == 1
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code", "message"),
    [
        ("/predict?model=nope", {"content": b"x"}, 404, "model_not_found", "unknown model 'nope'"),
        ("/predict?version=9", {"content": b"x"}, 404, "model_not_found", "has no version 9"),
        ("/predict?top_k=11", {"content": b"x"}, 422, "invalid_parameter", "between 1 and 10"),
        (
            "/predict?top_k=abc",
            {"content": b"x"},
            422,
            "invalid_parameter",
            "top_k: Input should be a valid integer",
        ),
        ("/predict", {"content": b""}, 422, "missing_image", "the request body is empty"),
        (
            "/predict",
            {"content": _png()[:60]},
            422,
            "invalid_image",
            "PNG data is corrupt or truncated",
        ),
        ("/predict", {"content": b"hello world"}, 415, "unsupported_image", "send JPEG, PNG"),
        (
            "/predict",
            {"content": b"x", "headers": {"Content-Type": "application/json"}},
            415,
            "unsupported_media_type",
            "'application/json' is not accepted",
        ),
        (
            "/predict",
            {"files": [("photo", ("a.png", b"x"))]},
            400,
            "bad_request",
            "unexpected form field 'photo'",
        ),
        (
            "/predict",
            {"data": {"file": "text"}, "files": [("other", ("a.png", b"x"))]},
            400,
            "bad_request",
            "form field 'file' is text",
        ),
        (
            "/embed?model=cifar10-resnet20&version=0",
            {"content": b"x"},
            422,
            "invalid_parameter",
            "version: Input should be greater than or equal to 1",
        ),
        ("/nowhere", {"content": b"x"}, 404, "not_found", "Not Found"),
    ],
)
def test_errors_are_json_with_a_code_and_a_message(
    server: Server, path: str, kwargs: dict, status: int, code: str, message: str
) -> None:
    response = httpx.post(server.url + path, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert message in error["message"]


def test_truncated_image_fails_only_its_own_request(server: Server, test_images: dict) -> None:
    data = test_images["portrait_90x120.png"]
    files = [("file", ("ok.png", data)), ("file", ("cut.png", data[: len(data) // 2]))]
    with server.client() as client:
        bad = client.post("/predict", files=files)
        good = client.post("/predict", content=data)
    assert bad.status_code == 422
    assert bad.json()["error"]["message"].startswith(
        "file 2 (cut.png) of 2: the PNG data is corrupt"
    )
    assert good.status_code == 200


def test_metrics_count_requests_by_route_model_and_status(
    server: Server, test_images: dict
) -> None:
    with server.client() as client:
        labels = {"route": "/predict", "model": "cifar10-resnet20"}
        ok = metric(client, "resnet_serve_requests_total", status="200", **labels)
        bad = metric(client, "resnet_serve_errors_total", code="unsupported_image", **labels)
        client.post("/predict", content=test_images["gray_64x48.png"])
        client.post("/predict", content=b"not an image")
        assert metric(client, "resnet_serve_requests_total", status="200", **labels) == ok + 1
        assert (
            metric(client, "resnet_serve_errors_total", code="unsupported_image", **labels)
            == bad + 1
        )
        text = client.get("/metrics").text
    for name in (
        "resnet_serve_request_duration_seconds_bucket",
        "resnet_serve_queue_wait_seconds_bucket",
        "resnet_serve_inference_seconds_bucket",
        "resnet_serve_batch_size_bucket",
        "resnet_serve_preprocess_seconds_bucket",
        'resnet_serve_queue_depth{model="cifar10-resnet20",version="1"}',
        'resnet_serve_model_ready{model="cifar10-resnet20",version="1"} 1.0',
    ):
        assert name in text


def test_openapi_documents_the_contract(server: Server) -> None:
    with server.client() as client:
        spec = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    predict = spec["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) >= {
        "image/jpeg",
        "image/png",
        "multipart/form-data",
    }
    assert {p["name"] for p in predict["parameters"]} == {"model", "version", "top_k"}
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/PredictResponse"}
    assert "application/x-npy" in spec["paths"]["/embed"]["post"]["responses"]["200"]["content"]
    assert predict["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
