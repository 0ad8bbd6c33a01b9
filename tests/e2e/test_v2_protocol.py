"""KServe v2 / Open Inference Protocol through the official client, ``tritonclient.http``.

Against the session's real server (``cifar10-resnet20``, and ``batched`` whose batches of
4 wait up to 5 s): health, metadata, config, inference with binary and JSON tensors,
image files as BYTES, requested outputs, classification, and the protocol's error cases.
Results must equal /predict and /embed on the same images.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from e2e_server import BATCHED, Server, metric

from service import __version__
from service.metadata import Preprocessing

MODEL = "cifar10-resnet20"
LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Decoded at full size for a 32-pixel model: equal to torchvision's transform (see test_inference).
EXACT = ("small_48x40.jpg", "portrait_90x120.png", "gray_64x48.png")
TOL = {"rtol": 1e-5, "atol": 1e-6}  # batches of other sizes may round differently in ORT


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(urlsplit(server.url).netloc, network_timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def images(test_images: dict[str, bytes]) -> list[bytes]:
    """Every test image: real CIFAR JPEGs, a draft-decoded 500x375 JPEG, PNGs, grayscale."""
    return [test_images[name] for name in sorted(test_images)]


@pytest.fixture(scope="module")
def tensors(
    test_images: dict[str, bytes],
    client: triton.InferenceServerClient,
    torchvision_eval: Callable[[bytes, Preprocessing], np.ndarray],
) -> tuple[list[bytes], np.ndarray]:
    """(image files, torchvision-preprocessed [N, 3, 32, 32]) with the config's preprocessing."""
    config = client.get_model_config(MODEL)
    spec = Preprocessing.model_validate_json(config["parameters"]["preprocessing"]["string_value"])
    names = [n for n in sorted(test_images) if n.startswith("cifar_") or n in EXACT]
    files = [test_images[n] for n in names]
    return files, np.stack([torchvision_eval(data, spec) for data in files])


def image_input(files: list[bytes], *, binary: bool = True) -> triton.InferInput:
    array = np.array(files if binary else [base64.b64encode(f) for f in files], dtype=object)
    return triton.InferInput("image", [len(files)], "BYTES").set_data_from_numpy(
        array, binary_data=binary
    )


def tensor_input(batch: np.ndarray, *, binary: bool = True) -> triton.InferInput:
    return triton.InferInput("input", list(batch.shape), "FP32").set_data_from_numpy(
        batch, binary_data=binary
    )


def predicted(server: Server, files: list[bytes], model: str = MODEL) -> np.ndarray:
    """[N, 10] softmax scores from /predict (multipart, top_k=10)."""
    parts = [("file", (f"{i}.img", data)) for i, data in enumerate(files)]
    response = httpx.post(
        f"{server.url}/predict", params={"model": model, "top_k": 10}, files=parts, timeout=60
    )
    assert response.status_code == 200, response.text
    scores = np.zeros((len(files), 10), dtype=np.float32)
    for row, result in zip(scores, response.json()["results"], strict=True):
        for p in result["predictions"]:
            row[p["index"]] = p["score"]
    return scores


def embedded(server: Server, files: list[bytes]) -> np.ndarray:
    parts = [("file", (f"{i}.img", data)) for i, data in enumerate(files)]
    body = httpx.post(f"{server.url}/embed", params={"model": MODEL}, files=parts, timeout=60)
    return np.array([r["embedding"] for r in body.json()["results"]], dtype=np.float32)


def test_server_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata() == {
        "name": "resnet-serve",
        "version": __version__,
        "extensions": [
            "binary_tensor_data",
            "classification",
            "model_configuration",
            "model_repository",
        ],
    }


def test_model_readiness(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")
    assert not client.is_model_ready("nope")


def test_model_metadata_has_shapes_with_a_batch_dimension(
    client: triton.InferenceServerClient,
) -> None:
    expected = {
        "name": MODEL,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "embedding", "datatype": "FP32", "shape": [-1, 64]},
        ],
        "parameters": {"precision": "fp32"},
    }
    assert client.get_model_metadata(MODEL) == expected
    assert client.get_model_metadata(MODEL, "1") == expected


def test_model_config_has_the_batching_settings(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == 32  # the service default
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert config["input"][0] == {
        "name": "input",
        "data_type": "TYPE_FP32",
        "format": "FORMAT_NCHW",
        "dims": [3, 32, 32],
        "optional": True,
    }
    assert [(o["name"], o["dims"]) for o in config["output"]] == [
        ("logits", [10]),
        ("probabilities", [10]),
        ("embedding", [64]),
    ]
    assert json.loads(config["parameters"]["labels"]["string_value"]) == LABELS
    batched = client.get_model_config(BATCHED, "1")  # its config.json: 4, 5000 ms, 16
    assert batched["max_batch_size"] == 4
    assert batched["dynamic_batching"] == {
        "max_queue_delay_microseconds": 5_000_000,
        "default_queue_policy": {"max_queue_size": 16},
    }


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_preprocessed_input_equals_predict_and_embed(
    client: triton.InferenceServerClient,
    server: Server,
    tensors: tuple[list[bytes], np.ndarray],
    binary: bool,
) -> None:
    files, batch = tensors
    outputs = [
        triton.InferRequestedOutput(n, binary_data=binary)
        for n in ("probabilities", "embedding", "logits")
    ]
    result = client.infer(MODEL, [tensor_input(batch, binary=binary)], outputs=outputs)
    assert result.get_response()["model_version"] == "1"
    probs = result.as_numpy("probabilities")
    assert probs.shape == (len(files), 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, predicted(server, files), **TOL)
    np.testing.assert_allclose(result.as_numpy("embedding"), embedded(server, files), **TOL)
    logits = result.as_numpy("logits")
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, softmax / softmax.sum(1, keepdims=True), **TOL)


def test_json_and_binary_tensors_give_the_same_numbers(
    client: triton.InferenceServerClient, tensors: tuple[list[bytes], np.ndarray]
) -> None:
    batch = tensors[1][:3]
    outputs = [triton.InferRequestedOutput("logits", binary_data=False)]
    as_json = client.infer(MODEL, [tensor_input(batch, binary=False)], outputs=outputs)
    as_binary = client.infer(MODEL, [tensor_input(batch)])  # every output, binary
    assert "data" in as_json.get_output("logits")
    assert as_binary.get_output("logits")["parameters"] == {"binary_data_size": 3 * 10 * 4}
    np.testing.assert_array_equal(as_json.as_numpy("logits"), as_binary.as_numpy("logits"))


def test_image_files_as_bytes_equal_predict_and_embed(
    client: triton.InferenceServerClient, server: Server, images: list[bytes]
) -> None:
    result = client.infer(MODEL, [image_input(images)])
    assert [o["name"] for o in result.get_response()["outputs"]] == [
        "logits",
        "probabilities",
        "embedding",
    ]
    np.testing.assert_allclose(result.as_numpy("probabilities"), predicted(server, images), **TOL)
    np.testing.assert_allclose(result.as_numpy("embedding"), embedded(server, images), **TOL)


def test_image_files_in_json_are_base64(
    client: triton.InferenceServerClient, server: Server, images: list[bytes]
) -> None:
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer(MODEL, [image_input(images[:3], binary=False)], outputs=outputs)
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), predicted(server, images[:3]), **TOL
    )


def test_only_the_requested_outputs_come_back(
    client: triton.InferenceServerClient, images: list[bytes]
) -> None:
    outputs = [triton.InferRequestedOutput("embedding", binary_data=False)]
    result = client.infer(MODEL, [image_input(images[:2])], outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["embedding"]
    assert response["id"] == "r-1"
    assert result.as_numpy("logits") is None
    assert result.as_numpy("embedding").shape == (2, 64)


def test_classification_returns_value_index_label(
    client: triton.InferenceServerClient, server: Server, images: list[bytes]
) -> None:
    outputs = [
        triton.InferRequestedOutput("probabilities", class_count=3),
        triton.InferRequestedOutput("logits", binary_data=False, class_count=10),
    ]
    result = client.infer(MODEL, [image_input(images)], outputs=outputs)
    classes = result.as_numpy("probabilities")
    assert (
        classes.shape == (len(images), 3)
        and result.get_output("probabilities")["datatype"] == "BYTES"
    )
    expected = predicted(server, images)
    for row, scores in zip(classes, expected, strict=True):
        parsed = [e.decode().split(":") for e in row]
        indices = [int(i) for _, i, _ in parsed]
        assert indices == np.argsort(-scores, kind="stable")[:3].tolist()
        assert [label for _, _, label in parsed] == [LABELS[i] for i in indices]
        np.testing.assert_allclose([float(v) for v, _, _ in parsed], scores[indices], **TOL)
    logit_classes = result.as_numpy("logits")
    assert logit_classes.shape == (len(images), 10)
    # JSON BYTES come back as str, binary ones as bytes.
    values = [[float(e.split(":")[0]) for e in row] for row in logit_classes]
    assert all(row == sorted(row, reverse=True) for row in values)


def test_requests_without_content_type_work(server: Server, tensors: tuple) -> None:
    """A plain JSON body, as in the README's curl example, with no Content-Type at all."""
    flat = tensors[1][:1].reshape(-1).tolist()
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": flat}
            ],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
        }
    )
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    connection.request("POST", f"/v2/models/{MODEL}/infer", body=body.encode())
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    assert response.status == 200, payload
    assert response.getheader("Content-Type") == "application/json"
    (output,) = payload["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (
        "probabilities",
        "BYTES",
        [1, 2],
    )
    best = predicted(server, tensors[0][:1])[0].argmax()
    assert output["data"][0].split(":")[1:] == [str(best), LABELS[best]]


def test_v2_requests_share_the_batcher_with_predict(server: Server, images: list[bytes]) -> None:
    """Two /predict and two v2 requests fill one batch of 4 on ``batched``."""
    labels = {"model": BATCHED, "version": "1"}

    def v2(data: bytes) -> np.ndarray:
        # One client per thread: tritonclient's clients are not thread-safe.
        with triton.InferenceServerClient(urlsplit(server.url).netloc, network_timeout=60) as c:
            return c.infer(BATCHED, [image_input([data])]).as_numpy("probabilities")[0]

    def rest(data: bytes) -> np.ndarray:
        return predicted(server, [data], BATCHED)[0]

    with server.client() as http_client:
        count = metric(http_client, "resnet_serve_batch_size_count", **labels)
        total = metric(http_client, "resnet_serve_batch_size_sum", **labels)
        with ThreadPoolExecutor(4) as pool:
            jobs = [
                pool.submit(f, data)
                for f, data in zip([v2, rest, v2, rest], images[:4], strict=True)
            ]
            results = [job.result() for job in jobs]
        assert metric(http_client, "resnet_serve_batch_size_count", **labels) == count + 1
        assert metric(http_client, "resnet_serve_batch_size_sum", **labels) == total + 4
    np.testing.assert_allclose(results, predicted(server, images[:4]), **TOL)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(
    client: triton.InferenceServerClient, tensors: tuple[list[bytes], np.ndarray], algorithm: str
) -> None:
    batch = tensors[1][:2]
    plain = client.infer(MODEL, [tensor_input(batch)]).as_numpy("logits")
    packed = client.infer(MODEL, [tensor_input(batch)], request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(packed.as_numpy("logits"), plain)


def test_openapi_documents_the_v2_routes(server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    infer = spec["paths"]["/v2/models/{model}/versions/{version}/infer"]["post"]
    assert [(p["name"], p["in"]) for p in infer["parameters"]] == [
        ("model", "path"),
        ("version", "path"),
    ]
    latest = spec["paths"]["/v2/models/{model}/infer"]["post"]
    assert [p["name"] for p in latest["parameters"]] == ["model"]
    body = infer["requestBody"]["content"]
    assert set(body) == {"application/json", "application/octet-stream"}
    assert set(body["application/json"]["schema"]["properties"]) == {
        "id",
        "parameters",
        "inputs",
        "outputs",
    }
    assert infer["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/V2Error"
    }
    assert spec["components"]["schemas"]["V2Error"]["properties"]["error"]["type"] == "string"
    assert {"/v2/repository/index", "/v2/models/{model}/config"} <= set(spec["paths"])
