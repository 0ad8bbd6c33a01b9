"""The deployment files as data (the Dockerfile's stages, YAML documents) and a live server.

Everything here reads the real files of the repository. Imported by the tests in this
folder by its own name, so that it never depends on which conftest module is loaded.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


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


SHIPPED_MODEL = REPO / "models" / "cifar10-resnet20" / "1" / "model.onnx"


@dataclass(frozen=True)
class LiveServer:
    """A real `python -m service` process, configured the way the images configure it."""

    port: int
    models_dir: Path
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
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
