"""End-to-end fixtures: real ``python -m service`` processes on free ports."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_server import BATCHED, Server, start_server


@pytest.fixture(scope="session")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """``launch(models_dir, *flags, ready=True)``; every server is stopped at the end."""
    servers: list[Server] = []

    def _launch(models: Path, *flags: str, ready: bool = True) -> Server:
        log = tmp_path_factory.mktemp("server") / "service.log"
        servers.append(start_server(models, log, *flags, ready=ready))
        return servers[-1]

    yield _launch
    for server in servers:
        server.stop()


@pytest.fixture(scope="module", params=[1, 2], ids=lambda n: f"workers={n}")
def workers(request: pytest.FixtureRequest) -> list[str]:
    """``--workers`` flags: one process, and two front ends over an engine process.

    Modules whose guarantees must hold across processes (drain, overload, faults, the v2
    repository, metrics) launch their servers with these, so each runs both ways.
    """
    return ["--workers", str(request.param)]


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory, cifar_model_file: Path) -> Path:
    """cifar10-resnet20/1 (service defaults) and batched/1 (max 4 per batch, 5 s delay)."""
    root = tmp_path_factory.mktemp("repo")
    for name in ("cifar10-resnet20", BATCHED):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").symlink_to(cifar_model_file)
    (root / BATCHED / "config.json").write_text(
        json.dumps({"max_batch_size": 4, "max_delay_ms": 5000, "max_queue_size": 16})
    )
    return root


@pytest.fixture(scope="session")
def server(launch: Callable[..., Server], model_repo: Path) -> Server:
    return launch(model_repo, "--default-model", "cifar10-resnet20")
