"""docker-compose.yml: the compose specification's schema, and what each service must have."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from deployfiles import DEPLOY, REPO, ParsedDockerfile

from service.settings import Settings

# ${VAR:-default} (compose interpolation): the value a plain `docker compose up` uses.
_INTERPOLATION = re.compile(r"\$\{[A-Z0-9_]+:-([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with (REPO / "docker-compose.yml").open() as f:
        return yaml.safe_load(f)


def _default(value: object) -> str:
    return _INTERPOLATION.sub(lambda m: m.group(1), str(value))


def test_valid_against_the_compose_specification() -> None:
    # check-jsonschema ships the compose-spec schema: no network needed.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            "docker-compose.yml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = (REPO / "docker-compose.yml").read_text().replace("driver: nvidia", "drivr: nvidia")
    (tmp_path / "docker-compose.yml").write_text(broken)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(tmp_path / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "'drivr' does not match any of the regexes" in result.stdout


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"serve-gpu", "serve-cpu", "prometheus", "export"}
    # `docker compose up` starts only the services without a profile: the GPU one.
    assert [n for n, s in services.items() if "profiles" not in s] == ["serve-gpu"]
    assert services["serve-cpu"]["profiles"] == ["cpu"]
    assert services["prometheus"]["profiles"] == ["metrics"]
    assert services["export"]["profiles"] == ["export"]
    # Prometheus must not pull the GPU service in when it runs beside serve-cpu.
    assert "depends_on" not in services["prometheus"]


def test_gpu_reservation(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["serve-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "deploy" not in compose["services"]["serve-cpu"]


@pytest.mark.parametrize(("service", "target"), [("serve-gpu", "gpu"), ("serve-cpu", "cpu")])
def test_serving_service(
    service: str,
    target: str,
    compose: dict[str, Any],
    parsed_dockerfile: ParsedDockerfile,
    settings_env_names: set[str],
    settings_from_env: Callable[[dict[str, str]], Settings],
) -> None:
    spec = compose["services"][service]
    assert spec["build"] == {"context": ".", "target": target}
    assert target in parsed_dockerfile.stages

    environment = spec["environment"]
    assert set(environment) <= settings_env_names
    settings = settings_from_env({k: _default(v) for k, v in environment.items() if v is not None})
    # Passed through from the shell, so model control and keys can be turned on; off unset.
    assert {"RESNET_SERVE_MODEL_CONTROL", "RESNET_SERVE_API_KEYS"} <= set(environment)
    assert settings.model_control == "none" and settings.api_keys == ()
    assert spec["ports"] == [f"${{RESNET_SERVE_PUBLISH_PORT:-8000}}:{settings.port}"]

    (volume,) = spec["volumes"]
    assert volume["target"] == str(settings.models_dir) == "/models"
    assert volume["read_only"] is True
    assert _default(volume["source"]) == "./models"

    # The same probe as the image's HEALTHCHECK.
    healthcheck = spec["healthcheck"]
    (docker_healthcheck,) = parsed_dockerfile.stages[target].instructions("HEALTHCHECK")
    assert tuple(healthcheck["test"]) == docker_healthcheck.value
    assert "/readyz" in healthcheck["test"][-1]
    for option in ("interval", "timeout", "retries", "start_period"):
        flag = f"--{option.replace('_', '-')}={healthcheck[option]}"
        assert flag in docker_healthcheck.flags


def test_providers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert _default(services["serve-gpu"]["environment"]["RESNET_SERVE_PROVIDERS"]) == "cuda"
    assert services["serve-cpu"]["environment"]["RESNET_SERVE_PROVIDERS"] == "cpu"


def test_prometheus_scrapes_the_serving_services(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    (config_mount,) = prometheus["volumes"]
    assert config_mount["source"] == "./deploy/prometheus.yml"
    assert config_mount["target"] == "/etc/prometheus/prometheus.yml"
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])

    with (DEPLOY / "prometheus.yml").open() as f:
        config = yaml.safe_load(f)
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    assert static["targets"] == ["serve-gpu:8000", "serve-cpu:8000"]


def test_export_tool_writes_into_the_models_folder(
    compose: dict[str, Any], parsed_dockerfile: ParsedDockerfile
) -> None:
    export = compose["services"]["export"]
    assert export["build"]["target"] == "export"
    (entrypoint,) = parsed_dockerfile.stages["export"].instructions("ENTRYPOINT")
    assert entrypoint.value == ("python", "-m", "export")
    (volume,) = export["volumes"]
    assert volume["target"] == "/models" and not volume.get("read_only", False)
