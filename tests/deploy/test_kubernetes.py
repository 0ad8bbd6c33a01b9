"""Kubernetes and KServe manifests, validated offline against the Kubernetes schemas that
kubernetes-validate bundles, and cross-checked with the image and the settings.

KServe's InferenceService is a custom resource, absent from those schemas, and its CRD is
over a megabyte (it inlines a whole PodSpec per component). Since a custom predictor *is*
a PodSpec plus KServe's ComponentExtensionSpec, it is validated as exactly that: the
extension fields against a schema transcribed from KServe's component.go, the rest
against the bundled, strict io.k8s.api.core.v1.PodSpec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from deployfiles import DEPLOY, ParsedDockerfile, load_yaml_documents
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

from service.settings import Settings

KUBERNETES = DEPLOY / "kubernetes"
KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"
# The newest Kubernetes the validator knows, and an old one still found in the wild.
VERSIONS = (kv_utils.latest_version(), "1.29.0")

# KServe v1beta1 ComponentExtensionSpec (pkg/apis/serving/v1beta1/component.go).
KSERVE_COMPONENT_EXTENSION: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "scaleTarget": {"type": "integer"},
        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
        "containerConcurrency": {"type": "integer", "minimum": 0},
        "timeout": {"type": "integer"},
        "canaryTrafficPercent": {"type": "integer"},
        "logger": {"type": "object"},
        "batcher": {"type": "object"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "deploymentStrategy": {"type": "object"},
    },
}


def _manifests() -> dict[str, dict[str, Any]]:
    docs = [d for path in sorted(KUBERNETES.glob("*.yaml")) for d in load_yaml_documents(path)]
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return _manifests()


def _schema_validator(name: str, version: str) -> jsonschema.protocols.Validator:
    """A strict validator for one bundled Kubernetes type, e.g. ``podspec-v1``."""
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv_utils.schema_contents(f"{folder}/{name}.json", version)
    definitions = kv_utils.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_the_manifests_are_the_expected_set(manifests: dict[str, dict[str, Any]]) -> None:
    assert sorted(manifests) == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Service",
    ]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Service"])
def test_valid_against_the_kubernetes_schema(kind: str, version: str) -> None:
    resource = _manifests()[kind]
    kubernetes_validate.validate(resource, version, strict=True)


def test_the_schema_check_rejects_a_typo(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    container = dict(deployment["spec"]["template"]["spec"]["containers"][0])
    container["readinessProbe"] = {**container["readinessProbe"], "periodSecond": 5}
    broken = {
        **deployment,
        "spec": {
            **deployment["spec"],
            "template": {
                **deployment["spec"]["template"],
                "spec": {**deployment["spec"]["template"]["spec"], "containers": [container]},
            },
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def _container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec["containers"]
    return container


def _check_serving_container(
    container: dict[str, Any], port: int | str, parsed_dockerfile: ParsedDockerfile
) -> None:
    """What both the Deployment and the InferenceService must say about the container."""
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["limits"])
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == port
    assert container["image"] == "resnet-serve:gpu"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # The image runs as this user; the pod must not ask for another one.
    (user,) = parsed_dockerfile.stages["gpu"].instructions("USER")
    assert user.value[0] == "10001:10001"


def test_deployment(
    manifests: dict[str, dict[str, Any]],
    parsed_dockerfile: ParsedDockerfile,
    settings_env_names: set[str],
    settings_from_env: Callable[[dict[str, str]], Settings],
) -> None:
    deployment, config_map = manifests["Deployment"], manifests["ConfigMap"]
    pod = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    container = _container(pod["spec"])
    _check_serving_container(container, "http", parsed_dockerfile)
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]

    assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    assert set(config_map["data"]) <= settings_env_names
    settings = settings_from_env(config_map["data"])
    assert str(settings.models_dir) == "/models"
    assert settings.model_control == "none"  # nobody in the cluster can unload the model
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": settings.port, "protocol": "TCP"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.port)


def test_service_and_autoscaler_point_at_the_deployment(
    manifests: dict[str, dict[str, Any]],
) -> None:
    deployment, service, hpa = (
        manifests["Deployment"],
        manifests["Service"],
        manifests["HorizontalPodAutoscaler"],
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # Utilisation targets need CPU requests on the container.
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in _container(deployment["spec"]["template"]["spec"])["resources"]["requests"]


@pytest.fixture(scope="module")
def inference_service() -> dict[str, Any]:
    (resource,) = load_yaml_documents(KSERVE)
    return resource


@pytest.mark.parametrize("version", VERSIONS)
def test_kserve_predictor_is_a_valid_pod_spec(
    inference_service: dict[str, Any], version: str
) -> None:
    assert inference_service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert inference_service["kind"] == "InferenceService"
    assert set(inference_service) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(inference_service["spec"]) == {"predictor"}
    _schema_validator("objectmeta-meta-v1", version).validate(inference_service["metadata"])

    predictor = inference_service["spec"]["predictor"]
    extension_keys = set(KSERVE_COMPONENT_EXTENSION["properties"])
    extension = {k: v for k, v in predictor.items() if k in extension_keys}
    pod_spec = {k: v for k, v in predictor.items() if k not in extension_keys}
    jsonschema.Draft202012Validator(KSERVE_COMPONENT_EXTENSION).validate(extension)
    _schema_validator("podspec-v1", version).validate(pod_spec)


def test_the_pod_spec_check_rejects_a_typo(inference_service: dict[str, Any]) -> None:
    predictor = inference_service["spec"]["predictor"]
    container = {**_container(predictor), "imagePullPolicyy": "Always"}
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicyy"):
        _schema_validator("podspec-v1", VERSIONS[0]).validate(
            {"containers": [container], "tolerations": predictor["tolerations"]}
        )


def test_kserve_predictor(
    inference_service: dict[str, Any],
    parsed_dockerfile: ParsedDockerfile,
    settings_env_names: set[str],
    settings_from_env: Callable[[dict[str, str]], Settings],
) -> None:
    annotations = inference_service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = inference_service["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]
    container = _container(predictor)
    # KServe routes traffic to the container with this name.
    assert container["name"] == "kserve-container"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= settings_env_names
    settings = settings_from_env(env)
    assert str(settings.models_dir) == "/models"
    assert settings.model_control == "none"  # nobody in the cluster can unload the model
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port
    _check_serving_container(container, settings.port, parsed_dockerfile)
