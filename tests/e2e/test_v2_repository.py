"""The v2 model-repository extension, not-ready models and engine failures, for real.

A server of its own (so that unloading never disturbs the session's server) over a
repository with ``cifar`` and ``spare`` (the same file); ``fragile``, a real ONNX model
whose Gather goes out of bounds when the first input value is huge (so ONNX Runtime
itself fails, nothing is mocked); and ``broken``, a file that is not ONNX at all.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from e2e_server import Server, metric, wait_for
from tritonclient.utils import InferenceServerException

Client = triton.InferenceServerClient
ROWS = np.random.default_rng(3).standard_normal((2, 3, 32, 32), dtype=np.float32)


def link(root: Path, name: str, model: Path) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.onnx").symlink_to(model)


def write_fragile(source: Path, target: Path) -> None:
    """``source`` plus logits + Gather(zeros[1], floor(input[0, 0, 0, 0] / 1e6)).

    The index is 0 or -1 (both valid) for any ordinary input, warm-up's random ones
    included, so the outputs are unchanged; 1e7 makes it 10 and ONNX Runtime fails.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(source)
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["raw_logits" if name == "logits" else name for name in node.output]
    constants = {
        "f_starts": np.zeros(4, np.int64),
        "f_ends": np.ones(4, np.int64),
        "f_flat": np.array([1], np.int64),
        "f_scale": np.array([1e6], np.float32),
        "f_zero": np.zeros(1, np.float32),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    graph.node.extend(
        [
            helper.make_node("Slice", ["input", "f_starts", "f_ends"], ["f_first"]),
            helper.make_node("Reshape", ["f_first", "f_flat"], ["f_value"]),
            helper.make_node("Div", ["f_value", "f_scale"], ["f_scaled"]),
            helper.make_node("Floor", ["f_scaled"], ["f_floor"]),
            helper.make_node("Cast", ["f_floor"], ["f_index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["f_zero", "f_index"], ["f_poison"]),
            helper.make_node("Add", ["raw_logits", "f_poison"], ["logits"]),
        ]
    )
    onnx.checker.check_model(model)
    target.parent.mkdir(parents=True)
    onnx.save(model, target)


@pytest.fixture(scope="module")
def repo(
    tmp_path_factory: pytest.TempPathFactory, cifar_model_file: Path, workers: list[str]
) -> Path:
    # A repository per server (per --workers): the tests add models to it.
    root = tmp_path_factory.mktemp("v2-repository")
    link(root, "cifar", cifar_model_file)
    link(root, "spare", cifar_model_file)
    write_fragile(cifar_model_file, root / "fragile" / "1" / "model.onnx")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return root


def connect(server: Server) -> Client:
    return triton.InferenceServerClient(urlsplit(server.url).netloc, network_timeout=60)


@pytest.fixture(scope="module")
def own_server(launch: Callable[..., Server], repo: Path, workers: list[str]) -> Server:
    # Never ready as a whole (broken fails to load): wait for every model to settle.
    flags = ["--max-batch-size", "4", "--model-control", "explicit", *workers]
    server = launch(repo, *flags, ready=False)
    with connect(server) as client:
        wait_for(
            lambda: (
                {e.get("state") for e in client.get_model_repository_index()}
                == {"READY", "UNAVAILABLE"}
            ),
            "the models to load",
            timeout=120,
        )
    return server


@pytest.fixture(scope="module")
def client(own_server: Server) -> Iterator[Client]:
    with connect(own_server) as c:
        yield c


def logits(client: Client, model: str, rows: np.ndarray = ROWS) -> np.ndarray:
    tensor = triton.InferInput("input", list(rows.shape), "FP32").set_data_from_numpy(rows)
    outputs = [triton.InferRequestedOutput("logits")]
    result: np.ndarray = client.infer(model, [tensor], outputs=outputs).as_numpy("logits")
    return result


def failure(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return int(caught.value.status()), caught.value.message()


def test_index_lists_the_repository_with_states(client: Client, own_server: Server) -> None:
    index = client.get_model_repository_index()
    assert [(e["name"], e["version"], e["state"]) for e in index] == [
        ("broken", "1", "UNAVAILABLE"),
        ("cifar", "1", "READY"),
        ("fragile", "1", "READY"),
        ("spare", "1", "READY"),
    ]
    assert index[0]["reason"].startswith("failed to load: ")
    assert "is not a loadable ONNX model" in index[0]["reason"]
    ready = httpx.post(f"{own_server.url}/v2/repository/index", json={"ready": True}, timeout=30)
    assert [e["name"] for e in ready.json()] == ["cifar", "fragile", "spare"]


def test_not_ready_model_and_server_are_503(client: Client, own_server: Server) -> None:
    assert client.is_server_live() and not client.is_server_ready()
    ready = httpx.get(f"{own_server.url}/v2/health/ready", timeout=30)
    assert ready.status_code == 503
    assert ready.json()["error"].startswith("not ready: broken v1: failed to load: ")
    model = httpx.get(f"{own_server.url}/v2/models/broken/ready", timeout=30)
    assert model.status_code == 503
    status, message = failure(lambda: logits(client, "broken"))
    assert status == 503 and message.startswith("model 'broken' version 1 is failed to load")


def test_engine_failure_is_500_and_fails_only_its_batch(client: Client) -> None:
    poisoned = ROWS[:1].copy()
    poisoned[0, 0, 0, 0] = 1e7
    status, message = failure(lambda: logits(client, "fragile", poisoned))
    assert status == 500
    assert message.startswith("inference failed on a batch of 1: ")
    assert "indices element out of data bounds" in message
    # The model and the service carry on; without the poison it is the cifar model.
    np.testing.assert_allclose(logits(client, "fragile"), logits(client, "cifar"), atol=1e-5)


def test_load_and_unload_round_trip(client: Client, repo: Path, cifar_model_file: Path) -> None:
    link(repo, "late", cifar_model_file)  # added while the server runs
    late = [e for e in client.get_model_repository_index() if e["name"] == "late"]
    assert late == [{"name": "late", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
    assert not client.is_model_ready("late")

    client.load_model("late")
    assert client.is_model_ready("late")
    expected = logits(client, "cifar")
    np.testing.assert_allclose(logits(client, "late"), expected, atol=1e-5)

    client.unload_model("late")
    assert not client.is_model_ready("late")
    assert failure(lambda: logits(client, "late")) == (
        404,
        "unknown model 'late'; served models: broken, cifar, fragile, spare",
    )
    late = [e for e in client.get_model_repository_index() if e["name"] == "late"]
    assert late[0]["state"] == "UNAVAILABLE"

    client.load_model("late")  # and back, without a restart
    np.testing.assert_allclose(logits(client, "late"), expected, atol=1e-5)


def test_unload_waits_for_the_request_in_flight(client: Client, own_server: Server) -> None:
    """Gated by the request's own body: half sent, the unload must wait for the rest."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 3, 32, 32],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": ROWS[0].nbytes},
                }
            ]
        }
    ).encode()
    body = header + ROWS[0].tobytes()
    address = urlsplit(own_server.url)
    with socket.create_connection((address.hostname, address.port), timeout=60) as sock:
        head = (
            f"POST /v2/models/spare/infer HTTP/1.1\r\nHost: test\r\n"
            f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {len(header)}\r\n"
        )
        sock.sendall(head.encode() + b"\r\n" + body[:100])
        # Every front end's requests in flight add up on /metrics: ours has resolved 'spare'.
        with httpx.Client(base_url=own_server.url, timeout=30) as metrics:
            wait_for(
                lambda: metric(metrics, "resnet_serve_requests_in_flight", model="spare") == 1,
                "the request to be in flight",
            )
        with ThreadPoolExecutor(1) as pool:
            unloading = pool.submit(lambda: connect(own_server).unload_model("spare"))
            wait_for(lambda: not client.is_model_ready("spare"), "the unload to start")
            assert not unloading.done()  # waiting for our request
            sock.sendall(body[100:])
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 200
            result = triton.InferResult.from_response_body(response.read())  # all JSON
            unloading.result()
    np.testing.assert_allclose(
        result.as_numpy("logits"), logits(client, "cifar", ROWS[:1]), atol=1e-5
    )
    assert failure(lambda: logits(client, "spare"))[0] == 404
    client.load_model("spare")
    assert client.is_model_ready("spare")


def test_load_and_unload_errors(client: Client, repo: Path) -> None:
    status, message = failure(lambda: client.load_model("nope"))
    assert (status, message) == (404, f"no model 'nope' under {repo}")
    status, message = failure(lambda: client.load_model("cifar", config="{}"))
    assert status == 400 and "parameters ['config'] are not supported" in message
    status, message = failure(lambda: client.load_model("broken"))
    assert status == 400
    assert message.startswith("model 'broken' did not load: version 1 failed to load: ")
    assert failure(lambda: client.unload_model("nope"))[0] == 404
    assert client.is_model_ready("cifar")


EXPLICIT_WARNING = "model_control is 'explicit' without api_keys: anyone who reaches the port"


def test_explicit_model_control_without_keys_warns_at_start(own_server: Server) -> None:
    assert EXPLICIT_WARNING in own_server.log.read_text()


def test_model_control_is_off_by_default(server: Server) -> None:
    """The session's server runs with the defaults: nobody can unload its only model."""
    with server.client() as http:
        for action in ("load", "unload"):
            response = http.post(f"/v2/repository/models/cifar10-resnet20/{action}")
            assert response.status_code == 403, action
            assert response.json() == {
                "error": f"model control is off: this server does not {action} models at run "
                "time. Start it with --model-control explicit "
                "(RESNET_SERVE_MODEL_CONTROL=explicit), together with --api-keys, to allow "
                "load and unload"
            }
        index = http.post("/v2/repository/index")  # the index stays readable
        assert index.status_code == 200
        assert {"name": "cifar10-resnet20", "version": "1", "state": "READY", "reason": ""} in (
            index.json()
        )
        assert http.get("/readyz").status_code == 200  # still serving
    assert EXPLICIT_WARNING not in server.log.read_text()
