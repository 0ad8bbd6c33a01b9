"""Shared views of the deployment files: the Dockerfile's stages, YAML documents, settings.

Everything here reads the real files of the repository; nothing is built or started.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
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
