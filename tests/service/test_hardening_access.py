"""API keys, CORS, request IDs and log lines, through the real app in process."""

from __future__ import annotations

import ast
import base64
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from inprocess import build_app, model_repo, png, running, serving

from service.logs import JsonFormatter, RequestIdFilter

KEY = "test-key-0123456789"
OTHER = "second-key-abcdef"
NEEDS_KEY = "this route needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Every log record, as the service writes it with --log-format json."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def v2_image_request(data: bytes) -> dict[str, object]:
    encoded = base64.b64encode(data).decode()
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [encoded]}]}


async def test_api_keys_guard_inference_and_admin_but_not_health(
    tmp_path: Path, cifar_model_file: Path
) -> None:
    image = png()
    async with serving(model_repo(tmp_path, cifar_model_file), api_keys=f"{KEY},{OTHER}") as c:
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
            assert (await c.get(path)).status_code == 200, path
        assert (await c.get("/docs")).status_code == 200
        guarded = [
            ("POST", "/predict"),
            ("POST", "/embed"),
            ("GET", "/models"),
            ("GET", "/models/cifar"),
            ("GET", "/nowhere"),
            ("GET", "/v2/models/cifar"),
            ("POST", "/v2/models/cifar/infer"),
            ("POST", "/v2/repository/index"),
            ("POST", "/v2/repository/models/cifar/unload"),
        ]
        for method, path in guarded:
            response = await c.request(method, path, content=image)
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"] == 'Bearer realm="resnet-serve"'
            expected = (
                {"error": NEEDS_KEY}  # the Open Inference Protocol's own error body
                if path.startswith("/v2/")
                else {"error": {"code": "unauthorized", "message": NEEDS_KEY}}
            )
            assert response.json() == expected, path
        assert (await c.get("/readyz")).json()["models"] == {"cifar/1": "ready"}  # not unloaded

        for headers in (
            {"Authorization": "Bearer wrong-key"},
            {"X-API-Key": KEY + "x"},
            {"Authorization": f"Basic {KEY}"},  # not a bearer token: no key presented
            {"Authorization": "Bearer "},
        ):
            refused = await c.post("/predict", content=image, headers=headers)
            assert refused.status_code == 401, headers
        wrong = await c.post("/predict", content=image, headers={"X-API-Key": "nope"})
        assert wrong.json()["error"]["message"] == "the API key is not valid"

        for headers in (
            {"Authorization": f"Bearer {KEY}"},
            {"authorization": f"bearer {OTHER}"},
            {"X-API-Key": OTHER},
        ):
            ok = await c.post("/predict?top_k=3", content=image, headers=headers)
            assert ok.status_code == 200, headers
            assert len(ok.json()["results"][0]["predictions"]) == 3
        v2 = await c.post(
            "/v2/models/cifar/infer", json=v2_image_request(image), headers={"X-API-Key": KEY}
        )
        assert v2.status_code == 200
        assert {o["name"] for o in v2.json()["outputs"]} == {"logits", "probabilities", "embedding"}
        models = await c.get("/models", headers={"X-API-Key": KEY})
        assert [m["name"] for m in models.json()["models"]] == ["cifar"]

        spec = (await c.get("/openapi.json")).json()
        assert spec["components"]["securitySchemes"] == {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        assert spec["security"] == [{"bearer": []}, {"apiKey": []}]
        assert spec["paths"]["/healthz"]["get"]["security"] == []
        assert "security" not in spec["paths"]["/predict"]["post"]  # the global rule applies
        metrics = (await c.get("/metrics")).text
        assert (
            'resnet_serve_errors_total{code="unauthorized",model="",route="unmatched"}' in metrics
        )


async def test_without_api_keys_everything_is_open(tmp_path: Path, cifar_model_file: Path) -> None:
    async with serving(model_repo(tmp_path, cifar_model_file)) as client:
        assert (await client.post("/predict", content=png())).status_code == 200
        assert (await client.get("/models")).status_code == 200
        assert "securitySchemes" not in (await client.get("/openapi.json")).json()["components"]


PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "x-api-key, x-request-timeout, content-type",
}


async def test_cors_is_off_by_default(tmp_path: Path) -> None:
    async with serving(tmp_path, loaded=False) as client:
        preflight = await client.options("/predict", headers=PREFLIGHT)
        assert preflight.status_code == 405
        assert "access-control-allow-origin" not in preflight.headers
        plain = await client.get("/healthz", headers={"Origin": "https://app.example"})
        assert plain.status_code == 200
        assert "access-control-allow-origin" not in plain.headers


async def test_cors_allows_the_configured_origins_only(tmp_path: Path) -> None:
    async with serving(
        tmp_path, loaded=False, cors_origins="https://app.example", api_keys=KEY
    ) as client:
        preflight = await client.options("/predict", headers=PREFLIGHT)  # no key needed
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert {"x-api-key", "x-request-timeout", "content-type", "authorization"} <= {
            h.strip() for h in allowed.split(",")
        }
        other = await client.options(
            "/predict", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
        # A browser script can read the 401 and its request ID.
        refused = await client.post("/predict", headers={"Origin": "https://app.example"})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == "https://app.example"
        exposed = refused.headers["access-control-expose-headers"].lower()
        assert "x-request-id" in exposed and "retry-after" in exposed


async def test_request_id_is_echoed_or_generated_on_every_response(
    tmp_path: Path, cifar_model_file: Path, json_log: io.StringIO
) -> None:
    model_repo(tmp_path, cifar_model_file)
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_text("not a model")
    async with serving(tmp_path, max_body_bytes=1000, default_model="cifar") as client:
        echoed = await client.get("/healthz", headers={"X-Request-ID": "trace-42:a/b"})
        assert echoed.headers["x-request-id"] == "trace-42:a/b"
        fresh = [(await client.get("/healthz")).headers["x-request-id"] for _ in range(2)]
        assert all(GENERATED.fullmatch(i) for i in fresh) and fresh[0] != fresh[1]
        for unusable in ("has spaces in it", "x" * 129, 'quote"d', "é-accent"):
            replaced = await client.get(
                "/healthz", headers={"X-Request-ID": unusable.encode("utf-8")}
            )
            assert GENERATED.fullmatch(replaced.headers["x-request-id"]), unusable
        answers = [
            await client.post(
                "/predict?model=broken", content=png(), headers={"X-Request-ID": "r-503"}
            ),
            await client.get("/nowhere", headers={"X-Request-ID": "r-404"}),
            await client.post("/predict", content=b"x" * 2000, headers={"X-Request-ID": "r-413"}),
            await client.post(
                "/predict", headers={"X-Request-ID": "r-422", "X-Request-Timeout": "soon"}
            ),
        ]
    assert [(a.status_code, a.headers["x-request-id"]) for a in answers] == [
        (503, "r-503"),
        (404, "r-404"),
        (413, "r-413"),
        (422, "r-422"),
    ]
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    warning = [r for r in lines if r["logger"] == "service.app" and r["level"] == "WARNING"]
    assert warning[0]["request_id"] == "r-503"  # the 503 is logged with the client's ID
    assert warning[0]["message"].startswith(
        "POST /predict: model_not_ready model 'broken' version 1 is failed to load"
    )
    assert set(warning[0]) == {"time", "level", "logger", "message", "request_id"}
    failed_load = [r for r in lines if r["logger"] == "service.registry"]
    assert failed_load[0]["request_id"] == "-"  # written outside any request
    assert "exception" in failed_load[0]


async def test_an_unhandled_error_is_a_json_500_with_the_request_id(
    tmp_path: Path, cifar_model_file: Path, json_log: io.StringIO
) -> None:
    """A bug (here planted in model lookup, the code under test being the error path)."""
    app = build_app(model_repo(tmp_path, cifar_model_file))

    def broken(*args: object) -> None:
        raise RuntimeError("planted bug")

    app.state.context.registry.resolve = broken
    async with running(app, loaded=False, raise_app_exceptions=False) as client:
        response = await client.post("/predict", content=png(), headers={"X-Request-ID": "r-500"})
        assert (await client.get("/healthz")).status_code == 200
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal error; see the service log"}
    }
    assert response.headers["x-request-id"] == "r-500"
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    failed = [r for r in records if r["message"] == "POST /predict failed"]
    assert failed and failed[0]["request_id"] == "r-500"
    assert "RuntimeError: planted bug" in failed[0]["exception"]


SERVICE = Path(__file__).resolve().parents[2] / "service"
NEVER = {"pickle", "dill", "joblib", "shelve", "marshal", "urllib.request", "http.client"}
NEVER |= {"requests", "httpx", "aiohttp", "urllib3", "torch"}


CLIENT = SERVICE / "client"
"""resnet-client: a command users run, which no request reaches (it is an HTTP client)."""


def test_the_service_never_unpickles_or_fetches_urls() -> None:
    """Static: no module a request can reach imports a deserializer of code or a URL client."""
    found = []
    for path in sorted(SERVICE.rglob("*.py")):
        if CLIENT in path.parents:
            continue
        if "service.client" in path.read_text():
            found.append(f"{path.name}: imports the client")
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                safe = isinstance(node.value, ast.Constant) and node.value.value is False
                found += [] if safe else [f"{path.name}: allow_pickle not False"]
            found += [f"{path.name}: imports {n}" for n in names if n in NEVER]
    assert found == []
    assert len(list(SERVICE.rglob("*.py"))) > 20  # the scan saw the package
