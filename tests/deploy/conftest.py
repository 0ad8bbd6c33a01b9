"""Shared views of the deployment files: the Dockerfile's stages, YAML documents, settings.

Everything here reads the real files of the repository; nothing is built or started.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import tomllib
import yaml

from service.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "service" / "deploy"


@dataclass
class Stage:
    """One ``FROM ... AS name`` block of the Dockerfile."""

    name: str
    base: str
    commands: list[Any] = field(default_factory=list)

    def instructions(self, cmd: str) -> list[Any]:
        return [c for c in self.commands if c.cmd == cmd]


@dataclass
class ParsedDockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def resolve(self, text: str) -> str:
        """Expand ``${ARG}`` with the global ARG defaults (what a plain build uses)."""
        for name, value in self.global_args.items():
            text = text.replace("${" + name + "}", value).replace("$" + name, value)
        return text


def parse_dockerfile(path: Path) -> ParsedDockerfile:
    """Parse with BuildKit's own parser (the `dockerfile` package wraps it)."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            base, _, name = command.value
            current = Stage(name=name, base=base)
            stages[name] = current
        elif current is None:
            if command.cmd == "ARG":
                key, _, default = command.value[0].partition("=")
                global_args[key] = default
        else:
            current.commands.append(command)
    return ParsedDockerfile(global_args=global_args, stages=stages)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def venv_tool(name: str) -> str:
    """A console script installed beside this interpreter (the dev extra), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make setup` (it is in the dev extra)")
    return found


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


SHIPPED_MODEL = REPO / "models" / "cifar10-resnet20" / "1" / "model.onnx"


@dataclass(frozen=True)
class LiveServer:
    """A real `python -m service` process, configured the way the images configure it."""

    port: int
    models_dir: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Poll /readyz until 200; fail with the server's log if it dies or takes too long."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the service exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)  # a subprocess's start-up: nothing to wait on but the socket
    pytest.fail(f"the service was not ready within 120 s:\n{log.read_text()}")


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
    port = _free_port()
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
        _wait_ready(process, port, log)
        yield LiveServer(port=port, models_dir=served_models_dir, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
