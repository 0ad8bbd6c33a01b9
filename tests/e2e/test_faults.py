"""Faults in models, against a real server: each hurts only what it must.

The repository holds a good model, a *poisoned* one whose real ONNX graph fails at run
time on batches holding a nearly white image (``faulty_models.py``: the failure happens
inside ONNX Runtime, through the real batcher and route; nothing is mocked), a truncated
model file and a model whose input has the wrong name.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2e_server import Server, metric, wait_for
from faulty_models import poisoned, renamed_input, truncated
from PIL import Image

POISON = "poison"


@pytest.fixture(scope="module")
def faults(
    launch: Callable[..., Server],
    tmp_path_factory: pytest.TempPathFactory,
    cifar_model_file: Path,
    workers: list[str],
) -> Server:
    root = tmp_path_factory.mktemp("faults")
    (root / "good" / "1").mkdir(parents=True)
    (root / "good" / "1" / "model.onnx").symlink_to(cifar_model_file)
    poisoned(cifar_model_file, root / POISON / "1" / "model.onnx")
    # Batches of two, waiting up to 3 s for the second image: two concurrent requests
    # always share one engine run.
    (root / POISON / "config.json").write_text(
        json.dumps({"max_batch_size": 2, "max_delay_ms": 3000})
    )
    truncated(cifar_model_file, root / "corrupt" / "1" / "model.onnx")
    renamed_input(cifar_model_file, root / "wrong" / "1" / "model.onnx")
    server = launch(root, "--default-model", "good", *workers, ready=False)
    with server.client() as client:
        wait_for(
            lambda: "loading" not in client.get("/readyz").json()["models"].values(),
            "every model loaded or failed",
            timeout=120,
        )
    return server


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buffer, "PNG")
    return buffer.getvalue()


WHITE = png((255, 255, 255))


def test_models_that_fail_to_load_are_not_ready_with_the_reason(
    faults: Server, test_images: dict[str, bytes]
) -> None:
    with faults.client() as client:
        ready = client.get("/readyz")
        versions = {m["name"]: m["versions"][0] for m in client.get("/models").json()["models"]}
        served = client.post("/predict?model=good", content=test_images["small_48x40.jpg"])
        refused = client.post("/predict?model=corrupt", content=test_images["small_48x40.jpg"])
        gauges = {m: metric(client, "resnet_serve_model_ready", model=m) for m in versions}
    assert ready.status_code == 503
    body = ready.json()
    assert body["models"] == {
        "corrupt/1": "failed",
        "good/1": "ready",
        f"{POISON}/1": "ready",
        "wrong/1": "failed",
    }
    reasons = body["reason"].split("; ")
    assert [r.split(":")[0] for r in reasons] == ["corrupt v1", "wrong v1"]
    assert "failed to load: " in reasons[0] and "is not a loadable ONNX model" in reasons[0]
    assert reasons[1].endswith("expected one input 'input', got ['pixels']")
    assert versions["corrupt"]["state"] == "failed"
    assert versions["corrupt"]["reason"] == reasons[0].removeprefix("corrupt v1: ")
    assert versions["wrong"]["reason"] == reasons[1].removeprefix("wrong v1: ")
    assert versions["good"]["state"] == "ready" and versions["good"]["provider"]
    assert served.status_code == 200
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_not_ready"
    assert refused.json()["error"]["message"].startswith(
        "model 'corrupt' version 1 is failed to load: "
    )
    assert gauges == {"corrupt": 0, "good": 1, POISON: 1, "wrong": 0}


def post_together(server: Server, bodies: list[bytes]) -> list[httpx.Response]:
    def post(body: bytes) -> httpx.Response:
        return httpx.post(f"{server.url}/predict?model={POISON}", content=body, timeout=60)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def test_an_engine_failure_fails_only_its_batch(
    faults: Server, test_images: dict[str, bytes]
) -> None:
    cat, dog = test_images["small_48x40.jpg"], test_images["portrait_90x120.png"]
    labels = {"model": POISON, "route": "/predict", "code": "inference_failed"}
    with faults.client() as client:
        failed_before = metric(client, "resnet_serve_errors_total", **labels)
        expected = [client.post("/predict?model=good", content=b).json() for b in (cat, dog)]

        failed = post_together(faults, [WHITE, cat])  # one batch: white poisons it
        for response in failed:
            assert response.status_code == 500
            error = response.json()["error"]
            assert error["code"] == "inference_failed"
            assert error["message"].startswith("inference failed on a batch of 2: ")
            assert "indices element out of data bounds" in error["message"]

        served = post_together(faults, [cat, dog])  # the next batch is served, correctly
        assert [r.status_code for r in served] == [200, 200]
        for response, reference in zip(served, expected, strict=True):
            assert response.json()["results"] == reference["results"]

        mixed = client.post(
            f"/predict?model={POISON}",
            files=[("file", ("white.png", WHITE)), ("file", ("cat.jpg", cat))],
        )
        assert mixed.status_code == 500
        assert metric(client, "resnet_serve_errors_total", **labels) == failed_before + 3
        assert client.post("/predict?model=good", content=cat).json() == expected[0]
        assert client.get("/healthz").status_code == 200
    assert faults.process.poll() is None
