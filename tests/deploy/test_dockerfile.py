"""The Dockerfile, checked without a container engine: hadolint, and its contract with
pyproject.toml (one source of dependencies) and service/settings.py (env configuration)."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from deployfiles import REPO, LiveServer, ParsedDockerfile, parse_dockerfile, venv_tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.settings import Settings

RUNTIME_TARGETS = ("cpu", "gpu")

# Shell words that end one simple command and start the next.
_SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
# pip options that take a value (the value is not a package).
_PIP_VALUE_OPTIONS = {
    "--extra-index-url",
    "--index-url",
    "-i",
    "--find-links",
    "-f",
    "--trusted-host",
    "--target",
    "-t",
    "--prefix",
    "--root",
    "--cache-dir",
    "--progress-bar",
    "--timeout",
    "--retries",
    "--config-settings",
    "-C",
}
# Ways of installing that bypass pyproject.toml.
_PIP_FORBIDDEN_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-e", "--editable"}
_OTHER_INSTALLERS = {"uv", "pipx", "conda", "mamba", "poetry", "easy_install", "pdm"}
_PROJECT_TARGET = re.compile(r"^\.(?:\[(?P<extras>[A-Za-z0-9_,.-]+)\])?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def declared_names(project: dict[str, Any]) -> set[str]:
    """Every distribution pyproject.toml names, in the base list or any extra."""
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs.extend(extra)
    return {canonicalize_name(Requirement(spec).name) for spec in specs}


def shell_commands(script: str) -> list[list[str]]:
    """Split a RUN script into simple commands (word lists), at &&, ||, ;, | and friends."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in _SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def _pip_call(words: list[str]) -> tuple[str, list[str]] | None:
    """(subcommand, arguments) if `words` runs pip, else None."""
    for i, word in enumerate(words):
        if Path(word).name in ("pip", "pip3") and i + 1 < len(words):
            return words[i + 1], words[i + 2 :]
        if word == "-m" and i + 2 < len(words) and words[i + 1] in ("pip", "pip3"):
            return words[i + 2], words[i + 3 :]
    return None


def undeclared_installs(script: str, project: dict[str, Any]) -> list[str]:
    """What a RUN script installs that pyproject.toml does not declare (empty: all good).

    Allowed: `pip install .` / `.[extra,...]` with declared extras, and a declared
    distribution pinned to a version (the GPU image's onnxruntime-gpu swap); `pip
    uninstall` of declared distributions. Requirement files, editable installs, other
    installers and apt's python3-* libraries are refused.
    """
    names = declared_names(project)
    extras = set(project["optional-dependencies"])
    problems: list[str] = []
    for words in shell_commands(script):
        if Path(words[0]).name in _OTHER_INSTALLERS:
            problems.append(f"installs with {words[0]}, not pip from pyproject.toml")
            continue
        if words[0] in ("apt-get", "apt") and "install" in words:
            problems += [
                f"apt installs the Python library {w}: declare it in pyproject.toml"
                for w in words
                if w.startswith("python3-") and w not in ("python3-venv", "python3-pip")
            ]
            continue
        call = _pip_call(words)
        if call is None or call[0] not in ("install", "uninstall"):
            continue
        subcommand, args = call
        skip_value = False
        for arg in args:
            if skip_value:
                skip_value = False
                continue
            if arg in _PIP_FORBIDDEN_OPTIONS:
                problems.append(f"pip {subcommand} {arg}: dependencies come from pyproject.toml")
                skip_value = True
                continue
            if arg.startswith("-"):
                skip_value = arg in _PIP_VALUE_OPTIONS
                continue
            project_target = _PROJECT_TARGET.match(arg)
            if project_target and subcommand == "install":
                unknown = set((project_target["extras"] or "").split(",")) - extras - {""}
                problems += [f"extra [{e}] is not in pyproject.toml" for e in sorted(unknown)]
                continue
            name = _NAME.match(arg)
            rest = arg[name.end() :] if name else arg
            if name is None or canonicalize_name(name.group()) not in names:
                problems.append(f"pip {subcommand} {arg}: not declared in pyproject.toml")
            elif subcommand == "install" and not rest.startswith("=="):
                problems.append(f"pip install {arg}: pin the version pyproject.toml resolved")
    return problems


def run_scripts(parsed: ParsedDockerfile, stage: str) -> list[str]:
    return [" ".join(c.value) for c in parsed.stages[stage].instructions("RUN")]


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [venv_tool("hadolint"), "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_every_disabled_hadolint_rule_says_why() -> None:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    ignores = [(i, line) for i, line in enumerate(lines) if "hadolint ignore=" in line]
    assert ignores, "expected the documented DL3006/DL3008/DL3013 exceptions"
    for index, line in ignores:
        rules = line.split("hadolint ignore=", 1)[1].split(",")
        comment = []
        for above in reversed(lines[:index]):
            if not above.startswith("#"):
                break
            comment.append(above)
        for rule in rules:
            assert any(rule.strip() in c for c in comment), (
                f"line {index + 1}: {rule} is disabled without a comment saying why"
            )
    assert not (REPO / ".hadolint.yaml").exists(), "rules are disabled in place, with reasons"


def test_the_dockerfile_installs_only_what_pyproject_declares(
    parsed_dockerfile: ParsedDockerfile, pyproject: dict[str, Any]
) -> None:
    pip_runs = 0
    for name in parsed_dockerfile.stages:
        for script in run_scripts(parsed_dockerfile, name):
            assert undeclared_installs(script, pyproject) == [], f"stage {name}: {script}"
            pip_runs += "pip install" in script
    assert pip_runs == 3  # export, cpu-build, gpu-build


@pytest.mark.parametrize(
    ("script", "problem"),
    [
        ("pip install requests", "pip install requests: not declared in pyproject.toml"),
        ("pip install -r requirements.txt", "pip install -r: dependencies come from"),
        ('pip install ".[nope]"', "extra [nope] is not in pyproject.toml"),
        ("python -m pip install onnxruntime", "pip install onnxruntime: pin the version"),
        ("apt-get install -y python3-numpy", "apt installs the Python library python3-numpy"),
        ("uv pip install .", "installs with uv"),
        ("true && /opt/venv/bin/pip install -e .", "pip install -e: dependencies come from"),
    ],
)
def test_the_install_check_catches_undeclared_installs(
    script: str, problem: str, pyproject: dict[str, Any]
) -> None:
    problems = undeclared_installs(script, pyproject)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_the_gpu_image_swaps_onnxruntime_for_onnxruntime_gpu(
    parsed_dockerfile: ParsedDockerfile,
) -> None:
    (swap,) = [s for s in run_scripts(parsed_dockerfile, "gpu-build") if "pip install" in s]
    commands = shell_commands(swap)
    steps = [" ".join(w) for w in commands if _pip_call(w)]
    # The reinstalled version is the one pip resolved for the `gpu` extra.
    assert [w for w in commands if w[0].startswith("ort_version=")] == [
        ["ort_version=$(/opt/venv/bin/pip show onnxruntime-gpu | sed -n 's/^Version: //p')"]
    ]
    assert steps == [
        "/opt/venv/bin/pip install .[gpu]",
        "/opt/venv/bin/pip uninstall -y onnxruntime",
        "/opt/venv/bin/pip install --no-deps --force-reinstall onnxruntime-gpu==${ort_version}",
    ]


def _stage_closure(parsed: ParsedDockerfile, target: str) -> set[str]:
    """Stages whose files end up in `target`, except `models` (checked separately)."""
    seen: set[str] = set()
    todo = [target]
    while todo:
        name = todo.pop()
        if name in seen or name not in parsed.stages:
            continue
        seen.add(name)
        stage = parsed.stages[name]
        todo.append(stage.base)
        for copy in stage.instructions("COPY"):
            todo += [f.split("=", 1)[1] for f in copy.flags if f.startswith("--from=")]
    return seen - {"models"}


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_runtime_images_contain_no_torch(
    target: str, parsed_dockerfile: ParsedDockerfile, pyproject: dict[str, Any]
) -> None:
    stages = _stage_closure(parsed_dockerfile, target)
    assert stages == {target, f"{target}-build"}
    installed = {canonicalize_name(Requirement(d).name) for d in pyproject["dependencies"]}
    for name in stages:
        for script in run_scripts(parsed_dockerfile, name):
            for words in shell_commands(script):
                call = _pip_call(words)
                for arg in call[1] if call and call[0] == "install" else []:
                    match = _PROJECT_TARGET.match(arg)
                    for extra in (match["extras"] or "").split(",") if match else []:
                        installed |= {
                            canonicalize_name(Requirement(d).name)
                            for d in pyproject["optional-dependencies"].get(extra, [])
                        }
    assert "onnxruntime" in installed
    assert not installed & {"torch", "torchvision"}
    # From the models stage (which may be the torch export stage) only /models is taken.
    copies = [c.value for c in parsed_dockerfile.stages[target].instructions("COPY") if c.flags]
    assert ("/models", "/models") in copies
    assert all(src == "/models" for src, _ in copies if src != "/opt/venv")


def test_the_default_build_takes_models_from_the_repository(
    parsed_dockerfile: ParsedDockerfile,
) -> None:
    models = parsed_dockerfile.stages["models"]
    assert parsed_dockerfile.resolve(models.base) == "models-repo"
    assert parsed_dockerfile.stages["models-repo"].base == "scratch"
    assert parsed_dockerfile.stages["models-export"].base == "export"
    export_run = run_scripts(parsed_dockerfile, "models-export")[0]
    assert 'python -m export "$arch" --weights "$weights" --out /models --name "$arch"' in (
        export_run
    )


def test_bases_and_default_target(parsed_dockerfile: ParsedDockerfile) -> None:
    stages = parsed_dockerfile.stages
    assert list(stages)[-1] == "gpu", "the last stage is what a plain `docker build` makes"
    gpu_base = parsed_dockerfile.resolve(stages["gpu"].base)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d", gpu_base)
    assert parsed_dockerfile.resolve(stages["gpu-build"].base) == gpu_base
    cpu_base = parsed_dockerfile.resolve(stages["cpu"].base)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", cpu_base)
    assert parsed_dockerfile.resolve(stages["cpu-build"].base) == cpu_base


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_runtime_stage_contract(
    target: str,
    parsed_dockerfile: ParsedDockerfile,
    settings_env_names: set[str],
    settings_from_env: Callable[[dict[str, str]], Settings],
) -> None:
    stage = parsed_dockerfile.stages[target]
    (user,) = stage.instructions("USER")
    assert user.value[0].split(":")[0] not in ("0", "root")

    env: dict[str, str] = {}
    for instruction in stage.instructions("ENV"):
        pairs = instruction.value
        env.update(zip(pairs[::2], pairs[1::2], strict=True))
    service_env = {k: v for k, v in env.items() if k.startswith("RESNET_SERVE_")}
    assert service_env.keys() <= settings_env_names
    settings = settings_from_env(service_env)
    assert str(settings.models_dir) == "/models"
    assert settings.host == "0.0.0.0"
    (expose,) = stage.instructions("EXPOSE")
    assert expose.value == (str(settings.port),)

    (entrypoint,) = stage.instructions("ENTRYPOINT")
    assert entrypoint.json and entrypoint.value == ("python", "-m", "service")
    assert not stage.instructions("CMD"), "configuration is environment variables only"
    (healthcheck,) = stage.instructions("HEALTHCHECK")
    assert healthcheck.value[:3] == ("CMD", "python", "-c")
    assert "/readyz" in healthcheck.value[3]


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_the_healthcheck_probes_readiness_of_a_live_server(
    target: str, parsed_dockerfile: ParsedDockerfile, live_server: LiveServer
) -> None:
    # The image's HEALTHCHECK command, run as Docker runs it (only the interpreter differs).
    (healthcheck,) = parsed_dockerfile.stages[target].instructions("HEALTHCHECK")
    command = [sys.executable, *healthcheck.value[2:]]

    def probe(port: int) -> int:
        env = {"RESNET_SERVE_PORT": str(port), "PATH": os.environ.get("PATH", "")}
        return subprocess.run(
            command, env=env, capture_output=True, timeout=30, check=False
        ).returncode

    assert probe(live_server.port) == 0
    with socket.socket() as unused:  # bound, not listening: connection refused
        unused.bind(("127.0.0.1", 0))
        assert probe(unused.getsockname()[1]) == 1


def test_the_parser_sees_every_stage() -> None:
    # Guards the helpers above: a parser that lost stages would make them vacuous.
    parsed = parse_dockerfile(REPO / "Dockerfile")
    assert set(parsed.stages) == {
        "export",
        "models-repo",
        "models-export",
        "models",
        "cpu-build",
        "cpu",
        "gpu-build",
        "gpu",
    }
    assert parsed.global_args["MODELS_FROM"] == "repo"
