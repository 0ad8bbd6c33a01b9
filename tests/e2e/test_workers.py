"""``--workers 2``: what only several processes can show.

Batches mix images from both front ends, one scrape adds up every process, a front end
killed under load fails only the requests on its connections and is restarted, and an
engine process killed makes the server not ready, fails what it held with 503, and
comes back. The ``batched`` model (max 4 per batch, 5 s delay) holds images in the
engine's queue for as long as a test needs them there.

Which front end holds a connection is read from ``/proc`` (the socket's inode among the
process's descriptors), so the tests choose their connections instead of hoping the
kernel spreads them.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from e2e_server import BATCHED, Server, metric, wait_for

LABELS = {"model": BATCHED, "version": "1"}


@pytest.fixture(scope="module")
def server(launch: Callable[..., Server], model_repo: Path) -> Server:
    flags = ["--default-model", "cifar10-resnet20", "--workers", "2"]
    return launch(model_repo, *flags, "--model-control", "explicit")


def started(server: Server, role: str) -> list[int]:
    """PIDs of the engine ('engine') or front ends ('front end') started so far, in order."""
    pattern = r"engine process (\d+) started" if role == "engine" else r"\(pid (\d+)\)"
    return [int(pid) for pid in re.findall(pattern, server.log.read_text())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def front_ends(server: Server) -> list[int]:
    return [pid for pid in started(server, "front end") if alive(pid)]


def owner(sock: socket.socket, pids: list[int]) -> int:
    """Which of ``pids`` holds the server side of the client socket ``sock``."""
    client_port = sock.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        # The remote end is our socket, and the connection is live: a closed one that held
        # the same client port before lingers in TIME_WAIT (state 06) with inode 0.
        if int(fields[2].split(":")[1], 16) == client_port and fields[3] == "01":
            inode = fields[9]
    if inode is None:
        raise AssertionError(f"no server socket connected to port {client_port}")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no front end holds the connection from port {client_port}")


def connections(server: Server, per_front_end: int) -> dict[int, list[socket.socket]]:
    """Open connections until each front end holds ``per_front_end`` of them."""
    address = urlsplit(server.url)
    pids = front_ends(server)
    held: dict[int, list[socket.socket]] = {pid: [] for pid in pids}
    spare = []
    for _ in range(200):
        if all(len(socks) >= per_front_end for socks in held.values()):
            break
        sock = socket.create_connection((address.hostname, address.port), timeout=60)
        # A request on it makes sure a front end has accepted it.
        assert get_status(sock, "/healthz") == 200
        socks = held[owner(sock, pids)]
        (socks if len(socks) < per_front_end else spare).append(sock)
    for sock in spare:
        sock.close()
    assert all(len(socks) >= per_front_end for socks in held.values()), "the kernel never spread"
    return held


def get_status(sock: socket.socket, path: str) -> int | None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return status_of(sock)


def request(sock: socket.socket, method: str, path: str) -> int | None:
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n".encode())
    return status_of(sock)


def send_predict(sock: socket.socket, data: bytes, model: str = BATCHED) -> None:
    head = (
        f"POST /predict?model={model}&top_k=1 HTTP/1.1\r\nHost: t\r\n"
        f"Content-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)


def status_of(sock: socket.socket) -> int | None:
    """The status of the response on ``sock``, or None when the connection died."""
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        response.read()
    except (ConnectionError, http.client.RemoteDisconnected):
        return None
    return response.status


@pytest.fixture
def image(test_images: dict[str, bytes]) -> bytes:
    return test_images["small_48x40.jpg"]


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def test_batches_mix_both_front_ends_and_one_scrape_adds_them_up(
    server: Server, client: httpx.Client, image: bytes
) -> None:
    held = connections(server, per_front_end=2)
    images = metric(client, "resnet_serve_images_total", model=BATCHED)
    mixed = metric(client, "resnet_serve_batch_sources_sum", **LABELS)
    batches = metric(client, "resnet_serve_batch_sources_count", **LABELS)
    socks = [sock for pair in zip(*held.values(), strict=True) for sock in pair]
    for sock in socks:  # four images, two from each front end: one full batch
        send_predict(sock, image)
    assert [status_of(sock) for sock in socks] == [200] * 4
    for sock in socks:
        sock.close()
    # Counted by the front ends that read them, and by the engine that batched them, and
    # shown whole by whichever front end answers the scrape.
    for _ in range(4):
        assert metric(client, "resnet_serve_images_total", model=BATCHED) == images + 4
    assert metric(client, "resnet_serve_batch_sources_count", **LABELS) == batches + 1
    assert metric(client, "resnet_serve_batch_sources_sum", **LABELS) == mixed + 2


def test_a_front_end_killed_under_load_fails_only_its_requests_and_comes_back(
    server: Server, client: httpx.Client, image: bytes
) -> None:
    held = connections(server, per_front_end=2)
    victim, survivor = list(held)
    for sock in held[victim]:  # queued in the engine, waiting for two more images
        send_predict(sock, image)
    wait_for(lambda: metric(client, "resnet_serve_queue_depth", **LABELS) == 2, "two images queued")
    batches = metric(client, "resnet_serve_batch_size_count", **LABELS)
    os.kill(victim, signal.SIGKILL)
    assert [status_of(sock) for sock in held[victim]] == [None, None]  # failed, never hung
    with ThreadPoolExecutor(4) as pool:  # the survivor's clients did not notice
        for sock in held[survivor]:
            send_predict(sock, image, model="cifar10-resnet20")
        assert list(pool.map(status_of, held[survivor])) == [200, 200]
    # The engine dropped what the dead front end had queued, unrun, at the batch deadline.
    wait_for(
        lambda: metric(client, "resnet_serve_queue_depth", **LABELS) == 0, "its images dropped"
    )
    assert metric(client, "resnet_serve_batch_size_count", **LABELS) == batches
    wait_for(lambda: len(front_ends(server)) == 2, "the front end to be restarted")
    assert victim not in front_ends(server)
    for socks in connections(server, per_front_end=1).values():  # both serve again
        send_predict(socks[0], image, model="cifar10-resnet20")
        assert status_of(socks[0]) == 200
    for socks in [*held.values()]:
        for sock in socks:
            sock.close()


def test_the_engine_killed_fails_what_it_held_with_503_and_recovers(
    server: Server, client: httpx.Client, image: bytes
) -> None:
    (engine,) = [pid for pid in started(server, "engine") if alive(pid)]
    address = urlsplit(server.url)
    socks = [socket.create_connection((address.hostname, address.port)) for _ in range(2)]
    for sock in socks:
        send_predict(sock, image)
    wait_for(lambda: metric(client, "resnet_serve_queue_depth", **LABELS) == 2, "two images queued")
    os.kill(engine, signal.SIGKILL)
    statuses = [status_of(sock) for sock in socks]
    assert statuses == [503, 503]
    ready = client.get("/readyz")
    if ready.json()["reason"] == "waiting for the engine process":  # not restarted yet
        assert ready.status_code == 503
        refused = client.post("/predict", content=image)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    wait_for(lambda: client.get("/readyz").status_code == 200, "recovery", timeout=60)
    assert [pid for pid in started(server, "engine") if alive(pid)] != [engine]
    for (sock,) in connections(server, per_front_end=1).values():  # each front end is back
        wait_for(lambda sock=sock: get_status(sock, "/readyz") == 200, "every front end ready")
        send_predict(sock, image, model="cifar10-resnet20")
        assert status_of(sock) == 200
        sock.close()
    for sock in socks:
        sock.close()


def test_a_model_unloaded_through_one_front_end_is_gone_from_every_one(server: Server) -> None:
    (a,), (b,) = connections(server, per_front_end=1).values()
    assert request(a, "POST", f"/v2/repository/models/{BATCHED}/unload") == 200
    assert request(b, "GET", f"/models/{BATCHED}") == 404  # the other front end knows
    assert request(b, "GET", f"/v2/models/{BATCHED}/ready") == 404
    assert request(b, "POST", f"/v2/repository/models/{BATCHED}/load") == 200
    assert request(a, "GET", f"/v2/models/{BATCHED}/ready") == 200  # and back, both ways
    assert request(b, "GET", f"/v2/models/{BATCHED}/ready") == 200
    for sock in (a, b):
        sock.close()
