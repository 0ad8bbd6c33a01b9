"""Large per-request buffers are reused, not mapped and faulted in again every request.

A 224 px row is 600 KB of float32 and its temporaries as much again; left to glibc's
default thresholds a ``--workers 2`` front end mapped them afresh for every request and
faulted in some 360 pages each time (0.7 ms of a 3 ms lone request). ``service.memory``
keeps freed buffers in the heap. The count of minor page faults across the server's
processes, read from ``/proc``, shows which happened.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from e2e_server import Server

from tools.null_model import write_null_model

REQUESTS = 150
FAULTS_PER_REQUEST = 40
"""Per request, all processes together; measured 0-1 with the thresholds, 360 without."""


def tree(root: int) -> list[int]:
    """``root`` and every process below it, from /proc's parent links."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    pids, frontier = [root], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        pids += children
        frontier = children
    return pids


def minor_faults(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
        except OSError:
            continue
    return total


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_224_px_request_does_not_fault_its_buffers_in_again(
    launch: Callable[..., Server],
    tmp_path: Path,
    test_images: dict[str, bytes],
    workers: str,
) -> None:
    write_null_model(tmp_path, size=224)
    server = launch(tmp_path, "--workers", workers)
    image = test_images["small_48x40.jpg"]
    with server.client() as client:

        def predict() -> None:
            response = client.post(
                "/predict", content=image, headers={"Content-Type": "image/jpeg"}
            )
            assert response.status_code == 200, response.text

        for _ in range(20):  # warm: the heaps reach their working size
            predict()
        pids = tree(server.process.pid)
        before = minor_faults(pids)
        for _ in range(REQUESTS):
            predict()
        faults = minor_faults(pids) - before
    assert faults / REQUESTS < FAULTS_PER_REQUEST, (
        f"{faults / REQUESTS:.0f} minor page faults per request across {len(pids)} processes"
    )
