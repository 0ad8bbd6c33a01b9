"""Overload on a real uvicorn process: shed what does not fit, serve the rest correctly.

48 clients send back to back for 3 s (loopback only) to a server that admits 12 requests
at once and queues 8 images; half the requests carry a 3 MB PNG, and one in four asks
for a 50 ms deadline. Every answer must be a correct 200, a 503 with Retry-After, or a
504; the server's memory must stay bounded, and it must be healthy and exact afterwards.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from e2e_server import Server, metric
from PIL import Image

CLIENTS = 48
SECONDS = 3.0
MAX_GROWTH_MIB = 100
"""How much the server's RSS may grow under load over its warmed-up size. Measured on two
cores: about 25 MiB with the admission limit, over 100 MiB with it lifted (every client's
3 MB body and decoded image held at once)."""


@pytest.fixture(scope="module")
def overloaded(launch: Callable[..., Server], model_repo: Path, workers: list[str]) -> Server:
    flags = ["--default-model", "cifar10-resnet20", "--max-queue-size", "8", *workers]
    flags += ["--max-batch-size", "4", "--max-concurrent-requests", "12"]
    return launch(model_repo, *flags)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakRss(threading.Thread):
    """Samples a process's resident memory every 20 ms until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.pid))


def same_predictions(got: list[dict], expected: list[dict]) -> bool:
    """Equal classes in equal order, scores equal to float32 rounding (batching may differ)."""
    got_p, want_p = got[0]["predictions"], expected[0]["predictions"]
    return [p["index"] for p in got_p] == [p["index"] for p in want_p] and np.allclose(
        [p["score"] for p in got_p], [p["score"] for p in want_p], atol=1e-5
    )


async def offer_load(url: str, images: list[bytes]) -> list[tuple[int, httpx.Response]]:
    """CLIENTS closed-loop clients for SECONDS: (image index, response) for every answer."""
    answers: list[tuple[int, httpx.Response]] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        stop = asyncio.get_running_loop().time() + SECONDS

        async def one_client(index: int) -> None:
            n = index
            while asyncio.get_running_loop().time() < stop:
                # Every other request the big image, else the small ones in turn.
                image = len(images) - 1 if n % 2 else (n // 2) % (len(images) - 1)
                headers = {"X-Request-Timeout": "0.05"} if n % 4 == 0 else {}
                response = await client.post(
                    "/predict?top_k=3", content=images[image], headers=headers
                )
                answers.append((image, response))
                n += 1

        await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))
    return answers


def test_overload_is_shed_with_503_or_504_and_every_200_is_right(
    overloaded: Server, test_images: dict[str, bytes]
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")  # 3 MB: noise does not compress
    small = [test_images[name] for name in sorted(test_images)]
    images = [*small, buffer.getvalue()]  # the last one is the big one
    with overloaded.client() as client:
        expected = [client.post("/predict?top_k=3", content=i).json()["results"] for i in images]
        for image in images * 3:  # warm: every code path and buffer used once
            client.post("/predict", content=image)
        baseline = rss_mib(overloaded.process.pid)
        sampler = PeakRss(overloaded.process.pid)
        sampler.start()
        started = time.monotonic()
        answers = asyncio.run(offer_load(overloaded.url, images))
        elapsed = time.monotonic() - started
        sampler.done.set()
        sampler.join()

        statuses = {status: 0 for status in (200, 503, 504)}
        for image, response in answers:
            assert response.status_code in statuses, response.text
            statuses[response.status_code] += 1
            body = response.json()
            if response.status_code == 200:
                assert same_predictions(body["results"], expected[image]), body
            elif response.status_code == 503:
                assert response.headers["retry-after"] == "1"
                assert body["error"]["code"] == "overloaded"
            else:
                assert body["error"]["code"] == "deadline_exceeded"
        assert elapsed < SECONDS + 30  # every request was answered, none hung
        assert statuses[200] >= 10, statuses
        assert statuses[503] >= 1, statuses  # more was offered than the server admits
        assert sampler.peak - baseline < MAX_GROWTH_MIB, (baseline, sampler.peak)

        # Healthy afterwards: ready, nothing left queued, and exact.
        assert client.get("/readyz").status_code == 200
        labels = {"model": "cifar10-resnet20", "version": "1"}
        assert metric(client, "resnet_serve_queue_depth", **labels) == 0
        for image, reference in zip(images, expected, strict=True):
            again = client.post("/predict?top_k=3", content=image)
            assert same_predictions(again.json()["results"], reference)
    assert overloaded.process.poll() is None
