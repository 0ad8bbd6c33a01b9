"""Concurrent requests share engine runs; a request whose client left is never run.

The ``batched`` model's config.json sets max_batch_size 4 and max_delay_ms 5000, so a
batch runs as soon as four images are queued, and the metrics show exactly what formed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from e2e_server import BATCHED, Server, metric, wait_for

LABELS = {"model": BATCHED, "version": "1"}


@pytest.fixture(scope="module")
def server(launch: Callable[..., Server], model_repo: Path, workers: list[str]) -> Server:
    """Batching and cancellation hold in one process and across front ends alike."""
    return launch(model_repo, "--default-model", "cifar10-resnet20", *workers)


def post(server: Server, data: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/predict?model={BATCHED}&top_k=1", content=data, timeout=60)


def test_concurrent_requests_form_one_batch(server: Server, test_images: dict[str, bytes]) -> None:
    images = [test_images[n] for n in sorted(test_images) if n.startswith("cifar_")]
    assert len(images) == 4
    with server.client() as client:
        count = metric(client, "resnet_serve_batch_size_count", **LABELS)
        total = metric(client, "resnet_serve_batch_size_sum", **LABELS)
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda data: post(server, data), images))
        assert [r.status_code for r in responses] == [200] * 4
        singles = [client.post("/predict?top_k=1", content=data).json() for data in images]
        assert metric(client, "resnet_serve_batch_size_count", **LABELS) == count + 1
        assert metric(client, "resnet_serve_batch_size_sum", **LABELS) == total + 4
        # The batch of four was cut into the right answers, in the right order.
        got = [r.json()["results"][0]["predictions"][0]["index"] for r in responses]
        assert got == [s["results"][0]["predictions"][0]["index"] for s in singles]


def test_request_of_a_client_that_left_is_dropped(
    server: Server, test_images: dict[str, bytes]
) -> None:
    data = test_images["small_48x40.jpg"]
    address = urlsplit(server.url)
    with server.client() as client:
        count = metric(client, "resnet_serve_batch_size_count", **LABELS)
        total = metric(client, "resnet_serve_batch_size_sum", **LABELS)
        gone = metric(
            client, "resnet_serve_requests_total", model=BATCHED, route="/predict", status="499"
        )
        with socket.create_connection((address.hostname, address.port)) as sock:
            head = (
                f"POST /predict?model={BATCHED} HTTP/1.1\r\nHost: test\r\n"
                f"Content-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
            )
            sock.sendall(head.encode() + data)
            wait_for(
                lambda: metric(client, "resnet_serve_queue_depth", **LABELS) == 1,
                "the request to be queued",
            )
        wait_for(
            lambda: (
                metric(
                    client,
                    "resnet_serve_requests_total",
                    model=BATCHED,
                    route="/predict",
                    status="499",
                )
                == gone + 1
            ),
            "the server to notice the disconnect",
        )
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: post(server, data), range(4)))
        assert [r.status_code for r in responses] == [200] * 4
        # One batch of exactly the four live requests: the abandoned one never ran.
        assert metric(client, "resnet_serve_batch_size_count", **LABELS) == count + 1
        assert metric(client, "resnet_serve_batch_size_sum", **LABELS) == total + 4
