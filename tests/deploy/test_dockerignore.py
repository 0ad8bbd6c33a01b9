""".dockerignore: what the build sees. Evaluated with Docker's own matching rules."""

from __future__ import annotations

import re
import subprocess
from functools import cache

import pytest
from deployfiles import REPO, ParsedDockerfile


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match syntax plus `**`, as moby's patternmatcher reads it."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


@cache
def _patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        cleaned = line.lstrip("!").strip("/")
        patterns.append((exclusion, _pattern_regex(cleaned)))
    return patterns


def is_ignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parents, decides."""
    parts = path.split("/")
    candidates = [path] + ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
    ignored = False
    for exclusion, regex in _patterns():
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not exclusion
    return ignored


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        "runs/r20/best.pt",
        ".git/HEAD",
        ".mypy_cache/3.11/service/settings.meta.json",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/0.6.0/123",
        ".hypothesis/examples/abc",
        "service/__pycache__/settings.cpython-311.pyc",
        "export/sub/__pycache__/x.cpython-311.pyc",
        "tests/deploy/test_dockerfile.py",
        "deploy/kubernetes/deployment.yaml",
        "tools/bench.py",
        "resnet_serve.egg-info/PKG-INFO",
        "docker-compose.yml",
        "Makefile",
    ],
)
def test_kept_out_of_the_build_context(path: str) -> None:
    assert is_ignored(path)


def _tracked_files() -> list[str]:
    result = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return result.stdout.split()


def test_the_context_holds_exactly_what_the_dockerfile_copies(
    parsed_dockerfile: ParsedDockerfile,
) -> None:
    sources = {
        source.rstrip("/")
        for stage in parsed_dockerfile.stages.values()
        for copy in stage.instructions("COPY")
        if not copy.flags
        for source in copy.value[:-1]
    }
    assert sources == {"pyproject.toml", "README.md", "service", "export", "models"}

    def copied(path: str) -> bool:
        return any(path == s or path.startswith(s + "/") for s in sources)

    tracked = _tracked_files()
    assert "service/metadata.py" in tracked and "Dockerfile" in tracked
    wrong = [p for p in tracked if is_ignored(p) == copied(p)]
    assert wrong == []


def test_a_model_repository_goes_into_the_context() -> None:
    assert not is_ignored("models/cifar10-resnet20/1/model.onnx")
    assert is_ignored("models/cifar10-resnet20/1/__pycache__/x.pyc")
