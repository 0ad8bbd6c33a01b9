"""Fixtures of the deployment tests: the parsed Dockerfile, pyproject, settings, a live server."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from deployfiles import (
    REPO,
    SHIPPED_MODEL,
    LiveServer,
    ParsedDockerfile,
    free_port,
    parse_dockerfile,
    wait_ready,
)

from service.settings import ENV_PREFIX, Settings


@pytest.fixture(scope="session")
def parsed_dockerfile() -> ParsedDockerfile:
    return parse_dockerfile(REPO / "Dockerfile")


@pytest.fixture(scope="session")
def pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]


@pytest.fixture(scope="session")
def settings_env_names() -> set[str]:
    """RESNET_SERVE_* variables the service reads, from service/settings.py itself."""
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


@pytest.fixture()
def settings_from_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str]], Settings]:
    """Build Settings the way a container does: from environment variables only."""

    def build(env: dict[str, str]) -> Settings:
        for key in list(os.environ):
            if key.startswith(ENV_PREFIX):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return Settings()

    return build


@pytest.fixture(scope="session")
def served_models_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The shipped model repository once it exists, else an untrained CIFAR ResNet-20
    exported by the real exporter under the shipped model's name."""
    if SHIPPED_MODEL.exists():
        return REPO / "models"
    try:  # the session-wide export of tests/conftest.py, shared with the service tests
        model_file: Path = request.getfixturevalue("cifar_model_file")
    except pytest.FixtureLookupError:
        from export.api import export_model

        out = tmp_path_factory.mktemp("models")
        model_file = Path(export_model("cifar-resnet20", out=out, name="cifar10-resnet20").path)
    return model_file.parents[2]


@pytest.fixture(scope="session")
def live_server(
    served_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`python -m service` with environment configuration only, on a free port."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env |= {
        f"{ENV_PREFIX}MODELS_DIR": str(served_models_dir),
        f"{ENV_PREFIX}HOST": "127.0.0.1",
        f"{ENV_PREFIX}PORT": str(port),
        f"{ENV_PREFIX}PREPROCESS_THREADS": "2",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=out, stderr=out
        )
    try:
        wait_ready(process, port, log)
        yield LiveServer(port=port, models_dir=served_models_dir, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
