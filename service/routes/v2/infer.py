"""POST /v2/models/{model}[/versions/{version}]/infer: the protocol onto the data plane.

Parses the protocol (optional compression, JSON header plus binary sections), checks the
one input and the outputs asked for, runs the rows through :class:`DataPlane` (the same
batchers as /predict) and encodes the outputs. A :class:`DirectRoute`, as /predict is:
no dependency solving per request; the path parameters are read from the request.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.routes.deps import DirectRoute, context_of, json_response
from service.routes.v2.metadata import MODEL, VERSION, resolve
from service.v2 import inference
from service.v2.codec import (
    HEADER_LENGTH,
    decode_inputs,
    decompress,
    encode_response,
    parse_request,
    split_body,
)
from service.v2.schemas import V2_ERRORS, InferRequest, InferResponse, inline_schema

router = APIRouter(
    tags=["KServe v2 / Open Inference Protocol"], responses=V2_ERRORS, route_class=DirectRoute
)

_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _path_parameter(name: str, description: str) -> dict[str, object]:
    """An OpenAPI path parameter (a DirectRoute's endpoint does not declare its own)."""
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


_MODEL_PARAMETER = _path_parameter("model", "Model name.")
_VERSION_PARAMETER = _path_parameter("version", "Model version, a positive integer.")
_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "The JSON request; with the binary data extension, raw tensor bytes "
    f"follow it and the {HEADER_LENGTH} header gives the JSON's length. Any or no "
    "Content-Type; Content-Encoding gzip or deflate.",
    "content": {
        "application/json": {"schema": inline_schema(InferRequest)},
        "application/octet-stream": _BINARY,
    },
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferResponse,
        "description": "JSON, or JSON then binary outputs (application/octet-stream, with "
        f"{HEADER_LENGTH}) when an output asked for binary_data",
        "content": {"application/octet-stream": _BINARY},
    }
}


@router.post(
    MODEL + "/infer",
    openapi_extra={"requestBody": _REQUEST_BODY, "parameters": [_MODEL_PARAMETER]},
    responses=_RESPONSES,
    summary="Inference (latest version)",
)
async def model_infer(request: Request) -> Response:
    return await _infer(request, request.path_params["model"], None)


@router.post(
    VERSION + "/infer",
    openapi_extra={
        "requestBody": _REQUEST_BODY,
        "parameters": [_MODEL_PARAMETER, _VERSION_PARAMETER],
    },
    responses=_RESPONSES,
    summary="Inference on a model version",
)
async def model_version_infer(request: Request) -> Response:
    return await _infer(request, request.path_params["model"], request.path_params["version"])


async def _infer(request: Request, model: str, version: str | None) -> Response:
    context = context_of(request)
    served = resolve(context, model, version)
    request.state.model = served.name
    loaded = served.require_loaded()
    dataplane = context.dataplane
    # In flight from here: unloading the model waits for this request (body included).
    with dataplane.in_flight(served):
        body = await dataplane.read_body(request)
        encoding = request.headers.get("content-encoding")
        body = decompress(body, encoding, limit=context.settings.max_body_bytes)
        header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        infer_request = parse_request(header)
        specs = inference.output_specs(infer_request, served, loaded)
        tensor = inference.single_input(decode_inputs(infer_request.inputs, binary), loaded)
        rows = await inference.run(request, served, dataplane, tensor)
    outputs, sections = inference.encode_outputs(rows, specs, loaded.engine.card.labels)
    payload: dict[str, object] = {"model_name": served.name, "model_version": str(served.version)}
    if infer_request.id is not None:
        payload["id"] = infer_request.id
    payload["outputs"] = outputs
    if not sections:
        return json_response(payload)
    content, header_length = encode_response(payload, sections)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
    )
