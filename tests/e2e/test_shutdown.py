"""SIGTERM under load, on a real uvicorn process: nothing accepted is lost or cut.

Eight requests wait in the ``slow`` model's queue (its batch waits 5 s for more images)
while three clients keep /predict busy on the ``fast`` model. On SIGTERM the server must
stop accepting connections at once, answer every request it had accepted in full and
correctly, then exit 0. The JSON access log, one line per answer with its request ID,
shows exactly which requests the server answered: each one reached its client whole.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from e2e_server import Server, metric, wait_for

HELD = 8


@pytest.fixture
def draining(
    launch: Callable[..., Server], tmp_path: Path, cifar_model_file: Path, workers: list[str]
) -> Server:
    for name in ("fast", "slow"):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "model.onnx").symlink_to(cifar_model_file)
    (tmp_path / "slow" / "config.json").write_text(
        json.dumps({"max_batch_size": 16, "max_delay_ms": 5000})
    )
    flags = ["--default-model", "fast", "--log-format", "json", "--access-log", "true", *workers]
    return launch(tmp_path, *flags, "--drain-timeout-s", "20", "--max-batch-size", "4")


def refused(url: str) -> bool:
    """Whether a new TCP connection to the server is refused: its listener is closed.

    While the listener is being closed the kernel may reset a connection instead
    (ECONNRESET: it had reached the accept queue, or met the close half-way), or let it
    time out. Neither says the listener is gone, so both mean "not yet": the caller
    polls until an attempt is refused outright.
    """
    address = urlsplit(url)
    try:
        socket.create_connection((address.hostname, address.port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except (ConnectionResetError, TimeoutError):
        return False
    return False


class Load:
    """Clients posting back to back until the server stops taking connections."""

    def __init__(self, server: Server, images: list[bytes], clients: int) -> None:
        self.server, self.images = server, images
        self.answers: dict[str, tuple[int, dict, int]] = {}  # ID -> status, body, image
        self.failures: dict[str, str] = {}  # request ID -> what the client saw
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(clients)]

    def run(self, index: int) -> None:
        with self.server.client() as client:
            for n in range(100_000):
                request_id = f"load-{index}-{n}"
                image = n % len(self.images)
                try:
                    response = client.post(
                        "/predict?top_k=3",
                        content=self.images[image],
                        headers={"X-Request-ID": request_id},
                    )
                except httpx.TransportError as exc:  # the server closed or refused
                    self.failures[request_id] = f"{type(exc).__name__}: {exc}"
                    return
                self.answers[request_id] = (response.status_code, response.json(), image)


def access_log(log: Path) -> dict[str, int]:
    """Request ID -> status, from the server's JSON access lines."""
    answered = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)  # every line is JSON, the start-up banner included
        if record["logger"] == "uvicorn.access":
            answered[record["request_id"]] = int(record["message"].rsplit(" ", 1)[1])
    return answered


def test_sigterm_drains_every_accepted_request_then_exits_0(
    draining: Server, test_images: dict[str, bytes]
) -> None:
    images = [test_images[name] for name in sorted(test_images)]
    with draining.client() as client:
        expected = [client.post("/predict?top_k=3", content=i).json()["results"] for i in images]
        load = Load(draining, images, clients=3)
        for thread in load.threads:
            thread.start()

        def held(i: int) -> httpx.Response:
            return httpx.post(
                f"{draining.url}/predict?model=slow&top_k=3",
                content=images[i % len(images)],
                headers={"X-Request-ID": f"held-{i}"},
                timeout=60,
            )

        with ThreadPoolExecutor(HELD) as pool:
            queued = [pool.submit(held, i) for i in range(HELD)]
            depth = {"model": "slow", "version": "1"}
            wait_for(lambda: metric(client, "resnet_serve_queue_depth", **depth) == HELD, "queue")
            wait_for(lambda: len(load.answers) >= 3, "load answered")
            draining.process.send_signal(signal.SIGTERM)
            wait_for(lambda: refused(draining.url), "new connections refused", timeout=10)
            assert draining.process.poll() is None  # still draining when it stopped accepting
            responses = [future.result(timeout=60) for future in queued]
    for thread in load.threads:  # each ends on its first refused or closed connection
        thread.join(60)
    assert draining.process.wait(60) == 0

    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert response.json()["results"] == expected[i % len(images)]
    for request_id, (status, body, image) in load.answers.items():
        assert status == 200, (request_id, body)
        assert body["results"] == expected[image], request_id
    assert len(load.failures) == 3, load.failures

    answered = access_log(draining.log)
    ours = {k: v for k, v in answered.items() if k.startswith(("held-", "load-"))}
    held_ids = {f"held-{i}": 200 for i in range(HELD)}
    assert ours == {**held_ids, **{request_id: 200 for request_id in load.answers}}
    assert not set(load.failures) & set(answered)  # what failed was never answered
    text = draining.log.read_text()
    assert "timeout graceful shutdown exceeded" not in text  # nothing cancelled
    assert "Application shutdown complete" in text
