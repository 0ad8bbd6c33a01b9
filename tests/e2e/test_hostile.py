"""Hostile and unusual inputs against a real server (``hostile_inputs.py`` lists them).

Each gets its exact status and, for errors, a JSON body with its code; the odd but valid
images are classified. Afterwards the server still answers /readyz and a normal /predict
with the same predictions as before, and its log holds no traceback.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
from e2e_server import Server
from hostile_inputs import Case, corpus

CHUNK = 256 * 1024


def send(client: httpx.Client, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if case.content_type is not None and case.files is None and case.data is None:
        headers["Content-Type"] = case.content_type
    content: bytes | Iterator[bytes] | None = case.body
    if case.chunked and case.body is not None:
        body = case.body
        content = (body[i : i + CHUNK] for i in range(0, len(body), CHUNK))
    return client.request(
        case.method,
        case.path,
        content=content,
        files=case.files,
        data=case.data,
        headers=headers,
    )


def server_errors(client: httpx.Client) -> float:
    """Every 5xx answer the server counted, whatever its route or model."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
        if sample.name == "resnet_serve_requests_total" and sample.labels["status"][0] == "5"
    )


def problem(case: Case, response: httpx.Response) -> str | None:
    """What is wrong with the answer to ``case``, or None."""
    if response.status_code != case.status:
        return f"status {response.status_code}, expected {case.status}: {response.text[:300]}"
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:300]}"
    if case.status == 200:
        predictions = [r["predictions"] for r in body["results"]]
        if len(predictions) != 1 or len(predictions[0]) != 5:
            return f"expected one image with 5 predictions, got {body}"
        return None
    error = body.get("error")
    if not isinstance(error, dict) or error.get("code") != case.code or not error.get("message"):
        return f"expected error code {case.code!r} with a message, got {body}"
    return None


def test_every_hostile_input_gets_its_exact_status_and_the_service_keeps_serving(
    server: Server, test_images: dict[str, bytes]
) -> None:
    cases = corpus()
    assert len(cases) >= 30
    normal = test_images["photo_500x375.jpg"]
    with server.client() as client:
        before = client.post("/predict", content=normal).json()
        errors_5xx = server_errors(client)
        problems = {}
        for case in cases:
            found = problem(case, send(client, case))
            if found is not None:
                problems[case.name] = found
        assert problems == {}

        assert client.get("/readyz").status_code == 200
        after = client.post("/predict", content=normal)
        assert after.status_code == 200 and after.json() == before
        # The corpus' only 5xx is its one 504 (a deadline already over on arrival).
        assert server_errors(client) == errors_5xx + 1
    assert server.process.poll() is None
    log = server.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
